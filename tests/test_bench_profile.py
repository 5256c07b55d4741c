"""studies.ort_profile: the per-operator account the README's torch.compile comparison rests on."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def test_op_times_cover_the_graphs_operators(tiny_ckpt, tiny_repo: Path) -> None:
    """Every operator type ONNX Runtime runs is counted, with positive time, and the convolutions are there;
    the per-run node count of Conv is at least the exported graph's (ORT may split, never drop them)."""
    import onnx

    from studies.ort_profile import op_times
    from biva_core.checkpoint import load_model
    from biva_export.graphs import graph_specs, inference_copy
    from biva_export.onnx_export import example_inputs

    plain = inference_copy(load_model(tiny_ckpt)[0])
    spec = graph_specs(plain)["biva_graph_encoder"]
    path = tiny_repo / "biva_graph_encoder" / "1" / "model.onnx"
    feeds = example_inputs(spec, plain, 4, seed=int(np.random.default_rng().integers(2**31)))
    micros, nodes = op_times(path, feeds, threads=1, runs=2)
    exported = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    assert exported > 0 and nodes.get("Conv", 0) >= exported, (exported, nodes)
    assert set(micros) == set(nodes) and all(v > 0 for v in micros.values()), micros


def test_cli_names_the_graphs_when_one_is_unknown(tiny_ckpt, tiny_repo: Path) -> None:
    from click.testing import CliRunner

    from studies.ort_profile import main

    r = CliRunner().invoke(main, ["--ckpt", str(tiny_ckpt), "--repo", str(tiny_repo), "--graph", "nope"])
    assert r.exit_code == 2 and "biva_graph_encoder" in r.output, r.output
