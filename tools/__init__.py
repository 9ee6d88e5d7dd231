"""Data-preparation tools, run as modules: `python -m tools.pickapic`, `python -m tools.hpdv2_benchmark`."""
