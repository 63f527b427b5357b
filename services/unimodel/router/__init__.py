"""router: picks the worker instance for each batch, tracks load, retries on a lost worker."""
