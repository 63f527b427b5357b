"""Helpers shared by the tests (and the benchmarks in scripts/bench): real servers on free ports, the
prepared model repository, process trees, doc examples, deploy-file checks. Imported as `helpers.<module>`
(pyproject's pytest `pythonpath` puts tests/ on the path)."""
