"""The serving contract: what the exporter writes, the served models read and the client sends, once.

Numpy only (no torch, no Triton): biva-export copies this file beside every python-backend model.py as
`biva_contract.py`, so the server imports the same file as the exporter, the client and the bench
(`biva_export.contract`). It holds

- the names: the three ONNX graphs, the four API (front) models, and which graphs each front model calls;
- the tensor specs of every served model (graphs: per row, batched; front models: free dimensions -1),
  built from the model's sizes; the graphs' outputs as named tuples, so outputs are paired by name;
- the request caps and the model metadata record (`ModelMeta`, frozen, to/from JSON) that every
  config.pbtxt carries as its `biva_meta` parameter;
- the request checks, shared by the front models, the graph models and the client;
- the importance-weighted log-mean-exp with its chunk and scorer-call plans (the served L_K and the bench),
  and the one ONNX Runtime session builder (validation, bench and the python-backend graph models).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np

# ---- names ----------------------------------------------------------------------------------------

SAMPLER, ENCODER, SCORER = "biva_sampler", "biva_encoder", "biva_scorer"
GRAPHS = (SAMPLER, ENCODER, SCORER)
MODEL_PREFIX = "biva_"  # front model name = prefix + role
ROLES = ("sample", "regenerate", "encode", "score")
SAMPLE, REGENERATE, ENCODE, SCORE = (MODEL_PREFIX + r for r in ROLES)  # the front (API) models
FRONT_GRAPHS = {SAMPLE: (SAMPLER,), REGENERATE: (SAMPLER,), ENCODE: (ENCODER,), SCORE: (SCORER,)}
META_PARAMETER = "biva_meta"  # config.pbtxt parameter holding ModelMeta.to_json()
ROLE_PARAMETER = "role"  # config.pbtxt parameter naming a front model's role
GRAPH_INSTANCES_PARAMETER = "graph_instances"  # a front model's parameter: instances of each graph model
# a graph model's config.pbtxt parameters (python backend): its ONNX file, intra-op threads, "1"/"0" spinning
ONNX_FILE_PARAMETER, THREADS_PARAMETER, SPINNING_PARAMETER = "onnx_file", "intra_op_threads", "intra_op_spinning"
# and the runtime that runs it: ONNX Runtime on model.onnx, or the AOTInductor package PACKAGE_FILE (export/aoti.py)
RUNTIME_PARAMETER, RUNTIMES, PACKAGE_FILE = "runtime", ("onnxruntime", "aoti"), "model.pt2"
# the aoti runtime keeps ONNX Runtime for calls of fewer rows: measured ahead of inductor at 1 row, behind at 8
AOTI_MIN_ROWS = 8
CONTRACT_COPY = "biva_contract.py"  # this file's name beside each python-backend model.py
REPORT = "export_report.json"  # written by biva-export at the repository's root


class SamplerOut(NamedTuple):
    images: object  # (B, C, H, W) Bernoulli / logistic means
    z_out: object  # (B, D) the flat latents used


class EncoderOut(NamedTuple):
    z: object  # (B, D) posterior sample
    q_mu: object  # (B, D)
    q_log_std: object  # (B, D)
    kl: object  # (B, G) analytic KL per latent group
    log_w: object  # (B, 1) log p(x, z) - log q(z | x): one importance sample of L_K


class ScorerOut(NamedTuple):
    log_w: object  # (B, S) log weight of each importance sample; sample 0's is L_1's
    log_w_gt_k: object  # (B, J) log weight of L^{>k} (eq. 2) of sample 0, for each of the row's J values of k
    kl: object  # (B, G) sample 0


GRAPH_OUTPUTS = {SAMPLER: SamplerOut, ENCODER: EncoderOut, SCORER: ScorerOut}


class T:
    """Every tensor name on the wire, written once: `T.images` is "images"."""

    images, z, k, temperature, noise = "images", "z", "k", "temperature", "noise"  # graph inputs (and API)
    z_out, q_mu, q_log_std, kl, log_w, log_w_gt_k = SamplerOut._fields[1], *EncoderOut._fields[1:3], \
        EncoderOut._fields[3], EncoderOut._fields[4], ScorerOut._fields[1]  # graph outputs: the tuples' fields
    n, seed, iw, ks = "n", "seed", "iw", "ks"  # API inputs
    elbo, iw_bound, l_gt_k = "elbo", "iw_bound", "l_gt_k"  # biva_score outputs

# ---- tensor specs ---------------------------------------------------------------------------------


SAMPLES, KS = "samples", "ks"  # the scorer's free per-row axes: importance samples S, values of k J (may be 0)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" or "int64"
    dims: tuple[int, ...]  # per-row shape for graphs; full shape for front models (-1: free)
    free: tuple[str, ...] = ()  # graphs: the axis each -1 in dims is (SAMPLES, KS), named as in the ONNX graph


@dataclass(frozen=True)
class GraphSpec:
    name: str  # Triton model name and ONNX file stem
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: dict[str, float]  # output name -> max |ONNX Runtime - PyTorch| allowed in validation

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class FrontSpec:
    name: str
    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    optional: tuple[str, ...] = ()


IMAGE_ATOL = 1e-4  # images and latents
NATS_ATOL = 1e-3  # every log-likelihood output, in nats


def _f32(name: str, *dims: int, free: tuple[str, ...] = ()) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(dims), free)


def _i64(name: str, *dims: int, free: tuple[str, ...] = ()) -> TensorSpec:
    return TensorSpec(name, "int64", tuple(dims), free)


def _outputs(graph: str, dims: dict[str, tuple[int, ...]]) -> tuple[TensorSpec, ...]:
    if graph == SCORER:  # every sample's log w, and L^{>k}'s for every k of the row
        return (_f32("log_w", -1, free=(SAMPLES,)), _f32("log_w_gt_k", -1, free=(KS,)), _f32("kl", *dims["kl"]))
    return tuple(_f32(n, *dims[n]) for n in GRAPH_OUTPUTS[graph]._fields)


def graph_specs(image_shape: tuple[int, ...], D: int, N: int, G: int) -> dict[str, GraphSpec]:
    """The three graphs for a model with images `image_shape`, D latent units, N noise units, G groups."""
    img = tuple(image_shape)
    out_dims = {"images": img, "z_out": (D,), "z": (D,), "q_mu": (D,), "q_log_std": (D,), "kl": (G,),
                "log_w": (1,), "log_w_gt_k": (1,)}
    atol = {n: (IMAGE_ATOL if n in ("images", "z_out", "z", "q_mu", "q_log_std") else NATS_ATOL) for n in out_dims}
    ins = {SAMPLER: (_f32("z", D), _i64("k", 1), _f32("temperature", 1), _f32("noise", D)),
           ENCODER: (_f32("images", *img), _f32("noise", N)),
           SCORER: (_f32("images", *img), _f32("noise", -1, N, free=(SAMPLES,)), _i64("k", -1, free=(KS,)))}
    specs = {}
    for g in GRAPHS:
        outs = _outputs(g, out_dims)
        specs[g] = GraphSpec(g, ins[g], outs, {t.name: atol[t.name] for t in outs})
    return specs


def front_specs(image_shape: tuple[int, ...], D: int, G: int) -> dict[str, FrontSpec]:
    """The request API. Non-batched models: -1 is a free dimension (B images, n samples, nk values)."""
    img = (-1, *image_shape)
    seed, temp = _i64("seed", 1), _f32("temperature", 1)
    specs = (
        FrontSpec(SAMPLE, "sample", (_i64("n", 1), seed, temp), (_f32("images", *img), seed),
                  ("seed", "temperature")),
        FrontSpec(REGENERATE, "regenerate", (_f32("z", -1, D), _i64("k", 1), seed, temp),
                  (_f32("images", *img), seed), ("seed", "temperature")),
        FrontSpec(ENCODE, "encode", (_f32("images", *img), seed),
                  (_f32("z", -1, D), _f32("q_mu", -1, D), _f32("q_log_std", -1, D), _f32("kl", -1, G), seed),
                  ("seed",)),
        FrontSpec(SCORE, "score", (_f32("images", *img), _i64("iw", 1), _i64("ks", -1), seed),
                  (_f32("elbo", -1), _f32("iw_bound", -1), _f32("l_gt_k", -1, -1), _f32("kl", -1, G), seed),
                  ("iw", "ks", "seed")),
    )
    return {s.name: s for s in specs}


# ---- caps and metadata ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caps:
    """Per-request limits, enforced by every served model and checked by the client before sending."""

    max_n: int = 1024  # samples per biva_sample request
    max_images: int = 1024  # images or latent rows per request
    max_iw: int = 5000  # importance samples K per image
    max_iw_rows: int = 262144  # K x images per biva_score request
    max_temperature: float = 10.0  # 0 < temperature <= this
    max_abs_latent: float = 1000.0  # |z| and |noise| at most this (larger finite values overflow to NaN)


@dataclass(frozen=True)
class ModelMeta:
    """The `biva_meta` parameter every served model carries (written by biva-export)."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    likelihood: str  # "bernoulli" (binary images) or "dmol" (8-bit)
    binarize: str  # how the checkpoint's test set was preprocessed: "threshold", "bernoulli" or "8bit"
    n_layers: int  # L, stochastic layers; k in 0..L
    latent_dim: int  # D, width of the flat z / q_mu / q_log_std
    noise_dim: int  # N, noise drawn per image per importance sample
    groups: tuple[str, ...]  # latent group names in the flat layout (z1_bu, z1_td, ..., zL)
    graph_max_batch: int  # rows per graph call (the graph models' max_batch_size)
    caps: Caps

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_dict(self) -> dict:
        """The JSON form as plain dicts and lists."""
        return json.loads(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        """Strict: a missing or unknown key raises ValueError (a repository from another version)."""
        d = json.loads(text)
        want = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != want:
            got = set(d) if isinstance(d, dict) else type(d).__name__
            shown = sorted(got) if isinstance(got, set) else got
            raise ValueError(f"{META_PARAMETER}: expected keys {sorted(want)}, got {shown}")
        caps = Caps(**d["caps"])
        return cls(image_shape=tuple(int(v) for v in d["image_shape"]), likelihood=str(d["likelihood"]),
                   binarize=str(d["binarize"]), n_layers=int(d["n_layers"]), latent_dim=int(d["latent_dim"]),
                   noise_dim=int(d["noise_dim"]), groups=tuple(d["groups"]),
                   graph_max_batch=int(d["graph_max_batch"]), caps=caps)

    @property
    def n_dims(self) -> int:
        """C * H * W, the denominator of bits per dimension."""
        return int(np.prod(self.image_shape))

    def data_meta(self) -> dict:
        """The checkpoint-style "data" entry that biva_core.data.load_for_model expects."""
        return {"image_shape": list(self.image_shape), "binarize": self.binarize, "test_seed": 0}

    def graph_specs(self) -> dict[str, GraphSpec]:
        return graph_specs(self.image_shape, self.latent_dim, self.noise_dim, len(self.groups))

    def front_specs(self) -> dict[str, FrontSpec]:
        return front_specs(self.image_shape, self.latent_dim, len(self.groups))

    def max_request_bytes(self) -> dict[str, int]:
        """model -> bytes of the largest request its caps allow (every input at its largest), so a front can
        refuse a larger declared size before anything is allocated."""
        item = {"float32": 4, "int64": 8}
        out = {}
        for name, spec in self.front_specs().items():
            total = 0
            for t in spec.inputs:  # a free dimension is rows (images, z) or, alone, the ks list
                free = self.caps.max_images if len(t.dims) > 1 else self.n_layers + 1
                total += item[t.dtype] * int(np.prod([free if d < 0 else d for d in t.dims]))
            out[name] = total
        free = {SAMPLES: 1, KS: self.n_layers + 1}  # rows x samples <= the graph's max batch; J <= L + 1
        for name, spec in self.graph_specs().items():
            row = lambda t: int(np.prod([d for d in t.dims if d > 0] + [free[a] for a in t.free]))  # noqa: E731
            out[name] = sum(item[t.dtype] * self.graph_max_batch * row(t) for t in spec.inputs)
        return out


# ---- request checks -------------------------------------------------------------------------------

INT64_MAX = 2**63 - 1


class RequestError(ValueError):
    """A request the served models refuse; the message names the field, the value and what was expected."""


def check_rows(name: str, a: np.ndarray, row_shape: tuple[int, ...], cap: int) -> None:
    """`a` is (B, *row_shape) with 1 <= B <= cap."""
    if a.ndim != 1 + len(row_shape) or tuple(a.shape[1:]) != tuple(row_shape) or not 1 <= a.shape[0] <= cap:
        want = "(B, " + ", ".join(map(str, row_shape)) + f") with 1 <= B <= {cap}"
        raise RequestError(f"{name}: expected shape {want}, got {tuple(a.shape)}")


def check_finite(name: str, a: np.ndarray, max_abs: float, what: str) -> None:
    if not np.isfinite(a).all():
        raise RequestError(f"{name}: contains NaN or Inf; expected {what}")
    if a.size and float(np.abs(a).max()) > max_abs:
        raise RequestError(f"{name}: |value| up to {float(np.abs(a).max()):g}, expected {what} with "
                           f"|value| <= {max_abs:g}")


def check_images(x: np.ndarray, meta: ModelMeta, cap: int) -> np.ndarray:
    """float32 (B, C, H, W), pixels in [0, 1] ({0, 1} for a binary model), 1 <= B <= cap."""
    check_rows("images", x, meta.image_shape, cap)
    if not np.isfinite(x).all():
        raise RequestError("images: contains NaN or Inf; expected pixel values in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise RequestError(f"images: values in [{lo:g}, {hi:g}], expected pixel values in [0, 1]")
    if meta.likelihood == "bernoulli" and not np.all((x == 0.0) | (x == 1.0)):
        raise RequestError("images: this model is binary; expected pixel values in {0, 1} "
                           f"(binarise with '{meta.binarize}' as the checkpoint's test set was)")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_vectors(name: str, a: np.ndarray, width: int, cap: int, max_abs: float) -> np.ndarray:
    """float32 (B, width) latents or noise, finite, |value| <= max_abs, 1 <= B <= cap."""
    check_rows(name, a, (width,), cap)
    check_finite(name, a, max_abs, "finite values")
    return np.ascontiguousarray(a, dtype=np.float32)


def _shown(a: np.ndarray):
    """A value for a message: the scalar itself, or the first few of many."""
    return a.reshape(-1)[0].item() if a.size == 1 else a.reshape(-1)[:8].tolist()


def check_k(name: str, k: np.ndarray | int, n_layers: int) -> None:
    a = np.asarray(k)
    if a.size and (a.min() < 0 or a.max() > n_layers):
        raise RequestError(f"{name}: got {_shown(a)}, expected values in 0..{n_layers}")


def check_temperature(t: np.ndarray | float, caps: Caps) -> None:
    a = np.asarray(t, dtype=np.float64)
    if a.size and not (np.isfinite(a).all() and a.min() > 0.0 and a.max() <= caps.max_temperature):
        raise RequestError(f"temperature: got {_shown(a)}, expected a value > 0 and "
                           f"<= {caps.max_temperature:g} (cap max_temperature)")


def _check_count(name: str, v: int, cap: int, cap_name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= cap:
        raise RequestError(f"{name}: got {v}, expected a value in 1..{cap} (cap {cap_name})")
    return int(v)


def check_n(n: int, caps: Caps) -> int:
    """Samples in one biva_sample request."""
    return _check_count("n", n, caps.max_n, "max_n")


def check_iw(iw: int, caps: Caps) -> int:
    """Importance samples K per image."""
    return _check_count("iw", iw, caps.max_iw, "max_iw")


def check_ks(ks: np.ndarray, n_layers: int) -> np.ndarray:
    ks = np.asarray(ks).reshape(-1).astype(np.int64)
    if not 1 <= ks.size <= n_layers + 1 or ks.min() < 0 or ks.max() > n_layers:
        raise RequestError(f"ks: got {ks.tolist()[:8]}, expected 1 to {n_layers + 1} values, each in 0..{n_layers}")
    return ks


def check_iw_rows(iw: int, batch: int, caps: Caps) -> None:
    if iw * batch > caps.max_iw_rows:
        raise RequestError(f"iw: iw x batch = {iw} x {batch} = {iw * batch} exceeds the cap max_iw_rows = "
                           f"{caps.max_iw_rows}; send at most {caps.max_iw_rows // iw} images per request")


def check_seed(seed: int, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= INT64_MAX:
        raise RequestError(f"{what}: expected an integer in 0..2^63-1, got {seed!r}")
    return int(seed)


def check_graph_inputs(graph: str, feeds: dict[str, np.ndarray], meta: ModelMeta) -> None:
    """The inputs of one graph request (rows already within max_batch_size, shapes checked by Triton)."""
    caps, rows = meta.caps, meta.graph_max_batch
    for name, a in feeds.items():
        if name == "images":
            check_images(a, meta, rows)
        elif name in ("z", "noise"):  # the scorer's noise (B, S, N): B x S rows within the graph's max batch
            flat = a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a
            check_vectors(name, flat, flat.shape[-1] if flat.ndim == 2 else -1, rows, caps.max_abs_latent)
        elif name == "k":
            check_k("k", a, meta.n_layers)
            if a.ndim == 2 and a.shape[1] > meta.n_layers + 1:
                raise RequestError(f"k: {a.shape[1]} values per row, expected at most {meta.n_layers + 1}")
        elif name == "temperature":
            check_temperature(a, caps)
    lens = {a.shape[0] for a in feeds.values()}
    if len(lens) != 1:
        raise RequestError(f"{graph}: inputs have different row counts {sorted(lens)}")


# ---- the importance-weighted estimator ------------------------------------------------------------


def iw_chunks(iw: int, batch: int, graph_rows: int) -> list[int]:
    """Importance samples per block when K = iw samples of `batch` images are drawn (and reduced) in blocks of
    at most `graph_rows` rows (rows = samples x batch)."""
    per_call = max(1, graph_rows // batch)
    return [min(per_call, iw - s) for s in range(0, iw, per_call)]


# Rows (images x samples) per scorer call of L_K. Small calls keep ONNX Runtime's activations in the caches:
# default28's encoder rows ran 1.4x faster per row in calls of 32 rows than in one call of 1000 (one thread,
# the project machine, a Xeon with 2 MB of L2 per core; 16 to 64 rows within 10% of the best). Each call runs
# the stages that see x alone once per image and costs a fixed few ms of ONNX Runtime's per-node overhead, so
# much smaller calls lose more than the caches give.
IW_CALL_ROWS = 32


def iw_calls(samples: int, batch: int, rows: int = IW_CALL_ROWS) -> list[tuple[slice, slice]]:
    """(images, samples) slices of the scorer calls that cover `samples` importance samples of `batch` images
    with at most `rows` rows each: min(samples, rows) samples of as many images as fit (at least one)."""
    s = max(1, min(samples, rows))
    b = max(1, rows // s)
    return [(slice(i, min(i + b, batch)), slice(j, min(j + s, samples)))
            for j in range(0, samples, s) for i in range(0, batch, b)]


class LogMeanExp:
    """log (1/K) sum_k exp(a_k) per image, accumulated over blocks of rows (c, B): L_K from log weights.

    float64, with a running log-sum-exp, so memory is one block whatever K is (biva_core.objectives'
    evaluate_bounds in numpy)."""

    def __init__(self, batch: int):
        self.lse = np.full(batch, -np.inf)
        self.count = 0

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float64)  # (c, B)
        m = block.max(axis=0)
        self.lse = np.logaddexp(self.lse, m + np.log(np.exp(block - m).sum(axis=0)))
        self.count += block.shape[0]

    def value(self) -> np.ndarray:
        return self.lse - math.log(self.count)


# ---- ONNX Runtime ---------------------------------------------------------------------------------

ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def ort_session(path: str, threads: int = 0, level: str = "all", gpu_device: int | None = None,
                saved_graph: str | None = None, spinning: bool | None = None):
    """The one ONNX Runtime session builder: `threads` intra-op threads (0: all cores), one inter-op
    thread, optimisation `level`; the CUDA provider on `gpu_device` where onnxruntime-gpu has it;
    `saved_graph`: also write the optimised graph there; `spinning`: whether idle intra-op threads
    busy-wait for work (None: ONNX Runtime's default, on)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    if saved_graph:
        opts.optimized_model_filepath = str(saved_graph)
    providers: list = ["CPUExecutionProvider"]
    if gpu_device is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": gpu_device}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), opts, providers=providers)


def aoti_runner(path: str, threads: int = 0):
    """The one AOTInductor package loader (export/aoti.py writes them): `threads` intra-op threads (0: torch's
    default); returns run(*arrays) -> outputs, numpy in the spec's input order, numpy out in its output order."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    package = torch._inductor.aoti_load_package(str(path))

    def run(*arrays):
        with torch.inference_mode():
            return [t.numpy() for t in package(*(torch.from_numpy(a) for a in arrays))]
    return run
