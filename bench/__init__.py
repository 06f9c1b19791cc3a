"""Benchmarks: `python -m bench NAME [--json PATH]`; each prints its figures and a ratio
against a baseline measured in the same run."""
