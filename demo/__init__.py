"""biva_demo: `make demo`, the main job end to end (export, serve, sample, score, OOD, stop)."""
