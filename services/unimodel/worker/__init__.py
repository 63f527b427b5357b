"""gpu-worker: hosts models on engines and runs the batches the router sends it."""
