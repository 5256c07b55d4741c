"""export/graph_passes.py: the ELU decomposition the exporter writes for ONNX Runtime's CPU provider, and its
inverse, checked against the Elu operator and against PyTorch on fresh random inputs."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from biva_core.checkpoint import load_model
from biva_core.runtimes import OrtOptions, ort_session
from biva_export.graph_passes import ELU_FORMS, apply_elu_form, compose_elu, decompose_elu
from biva_export.graphs import graph_specs, inference_copy
from biva_export.onnx_export import example_inputs, export_graph, validate_graph

torch.set_num_threads(1)


def _one_elu(alpha: float = 1.0) -> onnx.ModelProto:
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 7])  # noqa: E731
    g = helper.make_graph([helper.make_node("Elu", ["x"], ["y"], alpha=alpha)], "g", [vi("x")], [vi("y")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_decomposed_elu_matches_the_operator_over_its_whole_range():
    """Max(x, Exp(Min(x, 0)) - 1) against ONNX Runtime's Elu and float64 expm1, on normal inputs scaled up to
    +-100 (where a naive Exp(x) - 1 would overflow): within 4 float32 spacings of the value, never inf or nan."""
    rng = np.random.default_rng()
    x = (rng.standard_normal((4096, 7)) * rng.choice([0.01, 1.0, 10.0, 100.0], (4096, 1))).astype(np.float32)
    native, proto = _run(_one_elu(), x), _one_elu()
    assert decompose_elu(proto) == 1 and [n.op_type for n in proto.graph.node] == ["Min", "Exp", "Sub", "Max"]
    onnx.checker.check_model(proto, full_check=True)
    got = _run(proto, x)
    exact = np.where(x > 0, x.astype(np.float64), np.expm1(x.astype(np.float64)))
    tol = 4 * np.spacing(np.abs(exact).astype(np.float32)) + 1e-7
    assert np.isfinite(got).all()
    assert np.all(np.abs(got - exact) <= tol) and np.all(np.abs(native - exact) <= tol)
    assert np.array_equal(got[x > 0], x[x > 0])  # the positive half is exact


def test_an_elu_with_another_alpha_is_left_alone():
    proto = _one_elu(alpha=0.5)
    assert decompose_elu(proto) == 0 and [n.op_type for n in proto.graph.node] == ["Elu"]
    with pytest.raises(ValueError, match="ELU form must be one of"):
        apply_elu_form(proto, "fast")


@pytest.mark.parametrize("graph", ["biva_graph_sampler", "biva_graph_scorer"])
def test_both_forms_of_an_exported_graph_validate_and_compose_back(tiny_ckpt, tmp_path, graph):
    """Each ELU form of a real graph passes the exporter's validation against PyTorch; composing the decomposed
    graph gives back the native graph's operators, and both run to the same numbers within the spec's tolerance
    on fresh inputs."""
    model, _ = load_model(tiny_ckpt)
    plain = inference_copy(model)
    spec = graph_specs(plain)[graph]
    paths = {form: tmp_path / f"{form}.onnx" for form in ELU_FORMS}
    for form, path in paths.items():
        export_graph(spec, plain, path, elu=form)
        rep = validate_graph(spec, model, path, batches=(3, 17))
        assert rep.ok, (form, rep.summary())
    native, decomposed = (onnx.load(str(paths[f])) for f in ("native", "decomposed"))
    ops = lambda p: collections.Counter(n.op_type for n in p.graph.node)  # noqa: E731
    n_elu = ops(native)["Elu"]
    assert n_elu > 0 and ops(decomposed)["Elu"] == 0 and ops(decomposed)["Max"] >= n_elu
    assert compose_elu(decomposed) == n_elu and ops(decomposed) == ops(native)
    onnx.checker.check_model(decomposed, full_check=True)
    recomposed = tmp_path / "recomposed.onnx"
    onnx.save(decomposed, str(recomposed))
    feeds = example_inputs(spec, plain, 9, seed=int(np.random.default_rng().integers(2**31)))
    a = ort_session(str(paths["decomposed"]), OrtOptions(threads=1)).run(spec.output_names, feeds)
    b = ort_session(str(recomposed), OrtOptions(threads=1)).run(spec.output_names, feeds)
    for name, x, y in zip(spec.output_names, a, b):
        assert np.max(np.abs(x - y)) <= max(spec.atol[name], 2 * np.spacing(np.float32(np.max(np.abs(y))))), name
