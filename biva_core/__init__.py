"""BIVA: the model, its training and evaluation, and the numpy-only serving layer (contract.py, scoring.py,
routing.py, inflight.py, runtimes.py, stats.py)."""
