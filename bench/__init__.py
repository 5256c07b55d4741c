"""biva-bench: PyTorch eager vs ONNX Runtime vs Triton (HTTP, gRPC) on the three exported BIVA graphs,
with perf_analyzer's measurement method, the concurrency sweeps (the API models' requests through the fronts, as
users send them; batch-1 requests straight to a graph model), and the fraction of the fp32 GEMM rate. The harness
only: the one-off studies that fed the docs live in studies/ at the repository root (not installed).

    config.py    BenchConfig and the quick / full presets
    measure.py   warm-up, windows, stability, percentiles (sync and concurrent clients)
    backends.py  the timed calls: cases, in-process runners, Triton request bodies
    loadgen.py   closed-loop clients in separate processes (gRPC or HTTP) for the sweeps; a neighbour process
    triton.py    repository variants (dynamic batching off, threads, instances, queue), statistics deltas
    flops.py     FLOPs per image (ONNX graph and PyTorch counter) and the GEMM rate
    report.py    achieved fraction, ratios against the targets, JSON / markdown / PNG
    run.py       run_bench: the whole pass;  cli.py: the biva-bench command
"""
