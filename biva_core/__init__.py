"""BIVA: the model, its training and evaluation, and the numpy-only serving contract (contract.py, stats.py)."""
