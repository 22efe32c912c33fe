"""The libraries beneath the entry points (distill.py, prepare_data.py, eval.py, scripts/): reading data, loading
models, the machine, checkpoints and guards, the kinds of teacher (teacher, cache, cross), on-policy rows, the chunked
head loss, benchmarks. None imports an entry point (tests/test_layout.py); docs/training.md has the table."""
