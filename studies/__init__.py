"""One-off measurements that fed a doc or a threshold (not installed; run from the repository root as
`python -m studies.<name> ...`). The harness they build on is `biva_bench` (bench/); each module's first line
says what it measured and where the result went.

    crossover      the row threshold (routing.AOTI_MIN_ROWS)             docs/speed.md
    route          the served route against torch.compile, alternated     docs/speed.md
    iw_rows        IW rows on the scorer vs the encoder graph             scoring.iw_calls, IW_CALL_ROWS
    iw_floor       an IW scorer call against the GEMM limit               docs/speed_history.md
    ort_profile    ONNX Runtime's time per operator type                  docs/speed_history.md
    memory         server memory around a burst of large requests        docs/speed.md, docs/serving.md
    front_latency  what the HTTP and gRPC fronts add per request          issue 32
    ood_study      OOD candidate models, trained and scored               docs/ood.md
    train_speed    training throughput per configuration                  docs/training.md, docs/ood.md
    ood_table      the README's OOD table through the served path         README.md, docs/ood.md
"""
