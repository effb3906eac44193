"""Developer scripts, run as `python -m scripts.<name>` (the benchmark: `scripts.bench`)."""
