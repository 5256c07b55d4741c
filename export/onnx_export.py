"""torch.onnx.export of each graph from its spec, the ONNX checker, and validation against PyTorch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from biva_core.contract import KS, NATS_ATOL, SAMPLES, SCORE, GraphSpec, ModelMeta, T, TensorSpec, noise_rng
from biva_core.runtimes import ort_session
from biva_core.scoring import ScoreRequest, run_score
from biva_core.model import Biva
from biva_core.noise import NoiseStream
from biva_core.objectives import evaluate_request
from .graph_passes import apply_elu_form
from .graphs import GRAPH_MODULES

DEFAULT_OPSET = 18


class ValidationError(RuntimeError):
    """An exported graph disagrees with PyTorch beyond its tolerance."""


def _model_images(model: Biva, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Random images drawn from the model itself: Bernoulli pixels from prior samples' means (8-bit
    models: the means plus small noise, quantised). Pixel-noise images would put log p(x|z) in the
    thousands of nats, where float32 rounding alone exceeds 1e-3 nats; these are typical inputs."""
    with torch.no_grad():
        eps = torch.from_numpy(rng.standard_normal((batch, model.noise_dim), dtype=np.float32))
        mean = model.sample(eps).x_mean.numpy()
    if model.cfg.likelihood == "bernoulli":
        return (rng.random(mean.shape) < mean).astype(np.float32)
    return (np.round(np.clip(mean + rng.normal(0, 0.02, mean.shape), 0, 1) * 255) / 255).astype(np.float32)


def example_inputs(spec: GraphSpec, model: Biva, batch: int, seed: int, samples: int = 1, ks: int = 1
                   ) -> dict[str, np.ndarray]:
    """Fresh random inputs for a graph: images drawn from the model, normal noise and latents, k in 0..L;
    where the spec has free axes (the scorer's), `samples` importance samples and `ks` values of k per image."""
    rng = np.random.default_rng(seed)
    L = model.cfg.n_layers
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = (batch, *fixed_dims(t, {SAMPLES: samples, KS: ks}))
        if t.name == T.images:
            out[t.name] = _model_images(model, batch, rng)
        elif t.name == T.k:
            out[t.name] = rng.integers(0, L + 1, shape).astype(np.int64)
        elif t.name == T.temperature:
            out[t.name] = rng.uniform(0.3, 1.2, shape).astype(np.float32)
        else:  # noise, z
            out[t.name] = NoiseStream(int(rng.integers(2**62))).take_numpy(shape)
    return out


def fixed_dims(t: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    """A row's shape with each free axis (-1) at its size in `sizes`."""
    free = iter(t.free)
    return tuple(sizes[next(free)] if d == -1 else d for d in t.dims)


EXPORTERS = ("torchscript", "dynamo")
EXPORT_SIZES = {SAMPLES: 3, KS: 2}  # free axes in the traced example: not 0 or 1, which torch.export specialises


def dynamic_axes(t: TensorSpec) -> dict[int, str]:
    """The batch axis, and the spec's free axes (the scorer's samples and values of k) by name."""
    free = iter(t.free)
    return {0: "batch", **{i + 1: next(free) for i, d in enumerate(t.dims) if d == -1}}


def export_shapes(spec: GraphSpec) -> tuple[dict, ...]:
    """torch.export's dynamic_shapes for a graph's inputs: the batch axis and the spec's free axes."""
    dims = {"batch": torch.export.Dim("batch", min=1, max=65536),
            SAMPLES: torch.export.Dim(SAMPLES, min=1, max=65536), KS: torch.export.Dim(KS, min=0, max=64)}
    return tuple({i: dims[a] for i, a in dynamic_axes(t).items()} for t in spec.inputs)


def traced_inputs(spec: GraphSpec, model: Biva) -> tuple[torch.Tensor, ...]:
    """The example inputs a graph is traced with: 2 rows, EXPORT_SIZES along the free axes."""
    ex = example_inputs(spec, model, 2, seed=0, samples=EXPORT_SIZES[SAMPLES], ks=EXPORT_SIZES[KS])
    return tuple(torch.from_numpy(ex[n]) for n in spec.input_names)


def export_graph(spec: GraphSpec, model: Biva, path: Path, opset: int = DEFAULT_OPSET,
                 exporter: str = "torchscript", elu: str = "decomposed") -> None:
    """Export one graph with a dynamic batch dimension; weights inside the file (graphs are < 2 GB).

    "torchscript" (torch.onnx's tracing exporter, dynamo=False) is the default: about five times faster
    to export these graphs than "dynamo" (torch.export), with the same numbers (both are validated).
    `elu` is the form the graph's ELUs are written in (graph_passes.ELU_FORMS).
    """
    module = GRAPH_MODULES[spec.name](model).eval()
    args = traced_inputs(spec, model)
    common = dict(input_names=spec.input_names, output_names=spec.output_names, opset_version=opset)
    with torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(module, args, str(path), dynamo=True, dynamic_shapes=export_shapes(spec),
                              external_data=False, optimize=True, **common)
        elif exporter == "torchscript":
            axes = {t.name: dynamic_axes(t) for t in spec.inputs + spec.outputs}
            torch.onnx.export(module, args, str(path), dynamo=False, dynamic_axes=axes, **common)
        else:
            raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    proto = onnx.load(str(path))
    if apply_elu_form(proto, elu):
        onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)


@dataclass
class GraphReport:
    name: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    atol: dict[str, float] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)
    free: list[dict[str, int]] = field(default_factory=list)  # with each batch, its free axes' sizes (the scorer's)
    runtime: str = "ORT"  # what ran the exported graph: ONNX Runtime, or "AOTI" (an AOTInductor package)

    @property
    def ok(self) -> bool:
        return all(self.max_abs_diff[k] <= self.atol[k] for k in self.atol)

    def summary(self) -> str:
        parts = [f"{k} {v:.2e} (tol {self.atol[k]:.1e})" for k, v in self.max_abs_diff.items()]
        return f"{self.name}: {'ok' if self.ok else 'FAILED'}: max |{self.runtime} - torch|: " + ", ".join(parts)


VALIDATION_FREE = ({SAMPLES: 5, KS: 2}, {SAMPLES: 1, KS: 1}, {SAMPLES: 2, KS: 0})  # one per batch, in turn


def validate_graph(spec: GraphSpec, model: Biva, path: Path, batches: tuple[int, ...] = (1, 7, 33),
                   seed: int = 12345, atol_scale: float = 1.0) -> GraphReport:
    """Run the ONNX graph in ONNX Runtime and the PyTorch module on the same fresh inputs (compare_with_torch)."""
    sess = ort_session(str(path))
    return compare_with_torch(spec, model, lambda feeds: sess.run(spec.output_names, feeds), batches, seed,
                              atol_scale)


def compare_with_torch(spec: GraphSpec, model: Biva, run: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
                       batches: tuple[int, ...] = (1, 7, 33), seed: int = 12345, atol_scale: float = 1.0
                       ) -> GraphReport:
    """Run an exported graph (`run`: feeds -> outputs in the spec's order) and the PyTorch module on the same
    fresh inputs (several batch sizes, and with them VALIDATION_FREE's sizes of the free axes where the graph
    has some, J = 0 among them, so every dynamic axis is exercised) and record the max |difference| of every
    output, paired by name: the module returns the contract's named tuple, whose fields must be the spec's
    output names.

    A tolerance below two float32 spacings of the output's largest value cannot be met by any runtime (a
    natural-image log-likelihood of 20,000 nats is held to 0.002), so it is raised to that and the report
    records the tolerance used; `atol_scale` 0 keeps exact equality."""
    module = GRAPH_MODULES[spec.name](model).eval()
    free = [VALIDATION_FREE[i % len(VALIDATION_FREE)] for i in range(len(batches))] \
        if any(t.free for t in spec.inputs) else []
    rep = GraphReport(spec.name, atol={k: v * atol_scale for k, v in spec.atol.items()}, batches=list(batches),
                      free=free)
    for i, b in enumerate(batches):
        s, j = (free[i][SAMPLES], free[i][KS]) if free else (1, 1)
        ex = example_inputs(spec, model, b, seed + i, s, j)
        got = dict(zip(spec.output_names, run(ex)))
        with torch.no_grad():
            ref = module(*(torch.from_numpy(ex[n]) for n in spec.input_names))
        if tuple(getattr(ref, "_fields", ())) != tuple(spec.output_names):
            raise ValidationError(f"{spec.name}: the module returns {getattr(ref, '_fields', type(ref).__name__)}, "
                                  f"the spec names {spec.output_names}")
        for name, r in ref._asdict().items():
            _record(rep, name, got[name], r.numpy(), atol_scale)
    return rep


def _record(rep: GraphReport, name: str, g: np.ndarray, r: np.ndarray, atol_scale: float) -> None:
    """One output's max |difference| into the report (and its tolerance raised to two float32 spacings)."""
    if g.shape != r.shape:
        raise ValidationError(f"{rep.name}: output {name} has shape {g.shape}, PyTorch gives {r.shape}")
    d = float(np.max(np.abs(g - r))) if g.size else 0.0
    if not math.isfinite(d):
        d = math.inf
    rep.max_abs_diff[name] = max(rep.max_abs_diff.get(name, 0.0), d)
    if atol_scale > 0 and g.size:  # a float32 output is not finer than its spacing at that magnitude
        ulps = 2.0 * float(np.spacing(np.float32(np.max(np.abs(r)))))
        rep.atol[name] = max(rep.atol[name], ulps)


DETECTOR_ATOL = 0.05  # the detector's score (a sum of log densities) moves by up to ~30 per nat of its statistics


def score_routes(n_layers: int) -> tuple[ScoreRequest, ...]:
    """The biva_score requests validated at export: every estimator, several ks (k = 0 and L among them), L_K."""
    return (ScoreRequest("sample", 1, 6, (0, 1, n_layers)), ScoreRequest("mean", 4, 3, (1,)),
            ScoreRequest("mode", 1, 1, tuple(range(1, n_layers)) or (1,), want_iw=False))


def validate_score_routes(model: Biva, path: Path, meta: ModelMeta, detector=None, batch: int = 5,
                          seed: int = 777) -> list[GraphReport]:
    """biva_score's served plan (scoring.run_score) on the scorer graph in ONNX Runtime, for every estimator (and
    the detector's request and score), against PyTorch's evaluate_request on fresh images drawn from the model; 16
    graph rows, so requests span several blocks."""
    sess = ort_session(str(path))
    names = {True: [T.log_w, T.log_w_gt_k, T.kl], False: [T.log_w]}
    exec_calls = lambda feeds, ks: [sess.run(names[ks], f) for f in feeds]  # noqa: E731
    x = _model_images(model, batch, np.random.default_rng(seed))
    reqs = list(score_routes(meta.n_layers))
    if detector is not None:
        reqs.append(detector.request())
    reports = []
    for i, req in enumerate(reqs):
        got = run_score(req, x, noise_rng(seed + i), meta.noise_dim, 16, len(meta.groups), exec_calls)
        with torch.no_grad():
            ref = evaluate_request(model, torch.from_numpy(x), NoiseStream(seed + i), req, chunk=7)
        want = {T.elbo: ref.elbo, T.kl: ref.kl, T.l_gt_k: torch.stack([ref.l_gt_k[k] for k in req.ks], dim=1),
                **({T.iw_bound: ref.iw} if req.want_iw else {})}
        rep = GraphReport(f"{SCORE}[{req.estimator}]", atol={n: NATS_ATOL for n in want})
        for name, r in want.items():
            _record(rep, name, got[name], r.numpy(), 1.0)
        if detector is not None and i == len(reqs) - 1:
            rep.name, rep.atol[T.ood_score] = f"{SCORE}[detector]", DETECTOR_ATOL
            score = lambda o: detector.scores(o[T.elbo], o[T.kl], o[T.l_gt_k], o.get(T.iw_bound))  # noqa: E731
            _record(rep, T.ood_score, score(got), score({k: v.numpy() for k, v in want.items()}), 0.0)
        reports.append(rep)
    return reports
