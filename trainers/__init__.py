"""Training loops; each runs inside a worker process: `python -m trainers RUN_DIR`."""
