"""The libraries beneath the entry points (distill.py, prepare_data.py, eval.py, scripts/): reading data, loading
models, the machine, checkpoints, on-policy rows, benchmarks. None imports an entry point."""
