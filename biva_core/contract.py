"""The serving contract: what the exporter writes, the served models read, the client sends and the bench times.

The bottom layer of the project, numpy only (no torch, no Triton, nothing else of the project), so every step
imports it under one name, `biva_core.contract`: the source tree, the installed package, and the generated
model repository, where biva-export copies it beside every python-backend model.py (as biva_core/contract.py,
next to biva_core/stats.py). It holds

- the names: the three graph models, the five API (front) models and which graphs each calls, the config
  parameters, every tensor name on the wire (`T`);
- the tensor specs of every served model, built from the model's sizes; the graphs' outputs as named tuples,
  so outputs are paired by name;
- the request caps and the model metadata record (`ModelMeta`) every config.pbtxt carries;
- the request checks, shared by the front models, the graph models and the client;
- the seed -> noise stream (PyTorch's biva_core.noise wraps it), the scoring plan of a biva_score request (its
  estimator's draws, L_K's importance samples, the scorer calls) and its reduction, run once by the front
  models, the export's route validation and the bench (`run_score`);
- how graphs are served (`ServingConfig`), and the one ONNX Runtime session and AOTInductor package loader.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

# ---- names ----------------------------------------------------------------------------------------

SAMPLER, ENCODER, SCORER = "biva_graph_sampler", "biva_graph_encoder", "biva_graph_scorer"
GRAPHS = (SAMPLER, ENCODER, SCORER)
RENAMED = {"biva_sampler": SAMPLER, "biva_encoder": ENCODER, "biva_scorer": SCORER}  # earlier names -> these
MODEL_PREFIX = "biva_"  # front model name = prefix + role
ROLES = ("sample", "regenerate", "encode", "score", "detect")
SAMPLE, REGENERATE, ENCODE, SCORE, DETECT = (MODEL_PREFIX + r for r in ROLES)  # the front (API) models
FRONT_GRAPHS = {SAMPLE: (SAMPLER,), REGENERATE: (SAMPLER,), ENCODE: (ENCODER,), SCORE: (SCORER,),
                DETECT: (SCORER,)}
META_PARAMETER = "biva_meta"  # config.pbtxt parameter holding ModelMeta.to_json()
DETECTOR_PARAMETER = "biva_detector"  # biva_detect's parameter: the deployed detector's summary (no points)
ROLE_PARAMETER = "role"  # config.pbtxt parameter naming a front model's role
GRAPH_INSTANCES_PARAMETER = "graph_instances"  # a front model's parameter: instances of each graph model
# a graph model's config.pbtxt parameters (python backend): its ONNX file, intra-op threads, "1"/"0" spinning
ONNX_FILE_PARAMETER, THREADS_PARAMETER, SPINNING_PARAMETER = "onnx_file", "intra_op_threads", "intra_op_spinning"
# and the runtime that runs it: ONNX Runtime on model.onnx, or the AOTInductor package PACKAGE_FILE (export/aoti.py)
RUNTIME_PARAMETER, RUNTIMES, PACKAGE_FILE = "runtime", ("onnxruntime", "aoti"), "model.pt2"
# beside it, the same graph compiled for exactly AOTI_SLICE_ROWS images (the batch axis static, the scorer's samples
# and ks still free): a full slice runs on it, 0-10% faster than on the package that holds every batch size
# (docs/speed.md: the sampler gains most, the scorer nothing measurable); remainders and the scorer's many-draw slices run on PACKAGE_FILE
SLICE_PACKAGE_FILE = "model_slice.pt2"
AOTI_THREADS_PARAMETER = "aoti_threads"  # intra-op threads of a graph model's package (0: as ONNX Runtime's)
PACKAGE_ISA_PARAMETER = "aoti_isa"  # the CPU the package was compiled on: {"cpu": name, "flags": [cpuinfo flags]}
# the aoti runtime keeps ONNX Runtime for calls of fewer rows, where it leads (docs/speed.md: the row threshold,
# measured on an AMD EPYC and an Intel Xeon with 2 threads)
AOTI_MIN_ROWS = 8
# and for every call of an instance with fewer package threads: on one thread ONNX Runtime led the package at every
# row count (package / ONNX Runtime 0.73-1.01 over 1-64 rows, and 18 / 17 / 5% faster than the slice package on
# 32-row sampler / encoder / scorer calls on an AMD EPYC; docs/speed.md: the row threshold). Two instances of one
# thread each are the default layout on a 2-core machine; more cores per instance serve the packages.
AOTI_MIN_THREADS = 2
DETECTOR_FILE = "detector.json"  # beside biva_detect's model.py: the fitted detector (biva_core.stats.Detector)
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
    log_w: object  # (B, S) log weight of each draw of the latents (L_1's, and L_K's importance samples)
    log_w_gt_k: object  # (B, S, J) log weight of L^{>k} (eq. 2) of each draw, for each of the row's J values of k
    kl: object  # (B, S, G) analytic KL per latent group of each draw


GRAPH_OUTPUTS = {SAMPLER: SamplerOut, ENCODER: EncoderOut, SCORER: ScorerOut}


class T:
    """Every tensor name on the wire, written once: `T.images` is "images"."""

    images, z, k, temperature, noise = "images", "z", "k", "temperature", "noise"  # graph inputs (and API)
    z_out, q_mu, q_log_std, kl, log_w, log_w_gt_k = SamplerOut._fields[1], *EncoderOut._fields[1:3], \
        EncoderOut._fields[3], EncoderOut._fields[4], ScorerOut._fields[1]  # graph outputs: the tuples' fields
    n, seed, iw, ks, estimator, samples = "n", "seed", "iw", "ks", "estimator", "samples"  # API inputs
    elbo, iw_bound, l_gt_k = "elbo", "iw_bound", "l_gt_k"  # biva_score outputs (and kl)
    ood_score, ood_flag = "ood_score", "ood_flag"  # biva_detect outputs

# ---- tensor specs ---------------------------------------------------------------------------------


SAMPLES, KS = "samples", "ks"  # the scorer's free per-row axes: draws S, values of k J (may be 0)
DTYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}
ITEM_BYTES = {"float32": 4, "int64": 8, "bool": 1, "bytes": 16}  # "bytes": an estimator name, at most 16


WIRE_TYPES = {"float32": "FP32", "int64": "INT64", "bool": "BOOL", "object": "BYTES"}  # numpy dtype -> wire


def wire_type(a: np.ndarray) -> str:
    """The KServe / Triton datatype of an array sent as an input ("FP32", "INT64", "BOOL", "BYTES")."""
    return WIRE_TYPES[np.asarray(a).dtype.name]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a DTYPES key
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


def _t(dtype: str, name: str, *dims: int, free: tuple[str, ...] = ()) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims), free)


def _f32(name: str, *dims: int, free: tuple[str, ...] = ()) -> TensorSpec:
    return _t("float32", name, *dims, free=free)


def _i64(name: str, *dims: int, free: tuple[str, ...] = ()) -> TensorSpec:
    return _t("int64", name, *dims, free=free)


def graph_specs(image_shape: tuple[int, ...], D: int, N: int, G: int) -> dict[str, GraphSpec]:
    """The three graphs for a model with images `image_shape`, D latent units, N noise units, G groups."""
    img = tuple(image_shape)
    ins = {SAMPLER: (_f32(T.z, D), _i64(T.k, 1), _f32(T.temperature, 1), _f32(T.noise, D)),
           ENCODER: (_f32(T.images, *img), _f32(T.noise, N)),
           SCORER: (_f32(T.images, *img), _f32(T.noise, -1, N, free=(SAMPLES,)), _i64(T.k, -1, free=(KS,)))}
    outs = {SAMPLER: (_f32(T.images, *img), _f32(T.z_out, D)),
            ENCODER: (_f32(T.z, D), _f32(T.q_mu, D), _f32(T.q_log_std, D), _f32(T.kl, G), _f32(T.log_w, 1)),
            SCORER: (_f32(T.log_w, -1, free=(SAMPLES,)), _f32(T.log_w_gt_k, -1, -1, free=(SAMPLES, KS)),
                     _f32(T.kl, -1, G, free=(SAMPLES,)))}
    image_like = (T.images, T.z_out, T.z, T.q_mu, T.q_log_std)
    return {g: GraphSpec(g, ins[g], outs[g], {t.name: IMAGE_ATOL if t.name in image_like else NATS_ATOL
                                              for t in outs[g]}) for g in GRAPHS}


def front_specs(image_shape: tuple[int, ...], D: int, G: int) -> dict[str, FrontSpec]:
    """The request API. Non-batched models: -1 is a free dimension (B images, n samples, nk values)."""
    img = (-1, *image_shape)
    seed, temp = _i64(T.seed, 1), _f32(T.temperature, 1)
    score_in = (_f32(T.images, *img), _i64(T.iw, 1), _i64(T.ks, -1), seed, _t("bytes", T.estimator, 1),
                _i64(T.samples, 1))
    specs = (
        FrontSpec(SAMPLE, "sample", (_i64(T.n, 1), seed, temp), (_f32(T.images, *img), seed),
                  (T.seed, T.temperature)),
        FrontSpec(REGENERATE, "regenerate", (_f32(T.z, -1, D), _i64(T.k, 1), seed, temp),
                  (_f32(T.images, *img), seed), (T.seed, T.temperature)),
        FrontSpec(ENCODE, "encode", (_f32(T.images, *img), seed),
                  (_f32(T.z, -1, D), _f32(T.q_mu, -1, D), _f32(T.q_log_std, -1, D), _f32(T.kl, -1, G), seed),
                  (T.seed,)),
        FrontSpec(SCORE, "score", score_in,
                  (_f32(T.elbo, -1), _f32(T.iw_bound, -1), _f32(T.l_gt_k, -1, -1), _f32(T.kl, -1, G), seed),
                  (T.iw, T.ks, T.seed, T.estimator, T.samples)),
        FrontSpec(DETECT, "detect", (_f32(T.images, *img), seed),
                  (_f32(T.ood_score, -1), _t("bool", T.ood_flag, -1), seed), (T.seed,)),
    )
    return {s.name: s for s in specs}


# ---- caps and metadata ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caps:
    """Per-request limits, enforced by every served model and checked by the client before sending."""

    max_n: int = 1024  # samples per biva_sample request
    max_images: int = 1024  # images or latent rows per request
    max_iw: int = 5000  # importance samples K per image
    max_samples: int = 64  # draws S per image of the "mean" estimator
    # the cost of one biva_score / biva_detect request in scorer rows (images x top-down passes: every draw is one,
    # and each value of k one more for the draws that get L^{>k}): 65,536 rows take about a minute on two cores
    max_rows: int = 65536
    max_temperature: float = 10.0  # 0 < temperature <= this
    max_abs_latent: float = 1000.0  # |z| and |noise| at most this (larger finite values overflow to NaN)


IDENTITY = ("checkpoint_sha256", "image_shape", "likelihood", "binarize", "n_layers", "latent_dim", "groups")


@dataclass(frozen=True)
class ModelMeta:
    """The `biva_meta` parameter every served model carries (written by biva-export)."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    likelihood: str  # "bernoulli" (binary images) or "dmol" (8-bit)
    binarize: str  # how the checkpoint's test set was preprocessed: "threshold", "bernoulli" or "8bit"
    n_layers: int  # L, stochastic layers; k in 0..L
    latent_dim: int  # D, width of the flat z / q_mu / q_log_std
    noise_dim: int  # N, noise drawn per image per draw of the latents
    groups: tuple[str, ...]  # latent group names in the flat layout (z1_bu, z1_td, ..., zL)
    graph_max_batch: int  # rows per graph call (the graph models' max_batch_size)
    checkpoint_sha256: str  # the exported checkpoint: a fitted threshold or detector names the model it fits
    estimator: str  # biva_score's default estimator, when a request names none (ESTIMATORS)
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
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{META_PARAMETER}: expected keys {sorted(want)}, got {got} (a repository written by "
                             "another version of biva-export: export it again)")
        return cls(image_shape=tuple(int(v) for v in d["image_shape"]), likelihood=str(d["likelihood"]),
                   binarize=str(d["binarize"]), n_layers=int(d["n_layers"]), latent_dim=int(d["latent_dim"]),
                   noise_dim=int(d["noise_dim"]), groups=tuple(d["groups"]),
                   graph_max_batch=int(d["graph_max_batch"]), checkpoint_sha256=str(d["checkpoint_sha256"]),
                   estimator=str(d["estimator"]), caps=Caps(**d["caps"]))

    def identity(self) -> dict:
        """What a fitted threshold or detector records of the model it was fitted on (IDENTITY)."""
        d = self.to_dict()
        return {k: d[k] for k in IDENTITY}

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
        out = {}
        for name, spec in self.front_specs().items():  # a free dimension is rows (images, z) or, alone, the ks
            free = lambda t: self.caps.max_images if len(t.dims) > 1 else self.n_layers + 1  # noqa: E731
            out[name] = sum(ITEM_BYTES[t.dtype] * math.prod(free(t) if d < 0 else d for d in t.dims)
                            for t in spec.inputs)
        free = {SAMPLES: 1, KS: self.n_layers + 1}  # rows x samples <= the graph's max batch; J <= L + 1
        for name, spec in self.graph_specs().items():
            row = lambda t: math.prod([d for d in t.dims if d > 0] + [free[a] for a in t.free])  # noqa: E731
            out[name] = sum(ITEM_BYTES[t.dtype] * self.graph_max_batch * row(t) for t in spec.inputs)
        return out


def read_meta(repo: Path) -> ModelMeta:
    """The model metadata of a repository written by biva-export (from its report)."""
    return ModelMeta.from_json(json.dumps(json.loads((Path(repo) / REPORT).read_text())["meta"]))


# ---- request checks -------------------------------------------------------------------------------

INT64_MAX = 2**63 - 1


class RequestError(ValueError):
    """A request the served models refuse; the message names the field, the value and what was expected."""


class Busy(RuntimeError):
    """A request refused for now (the service is at its limit for requests of this cost): retry later."""


class Cancelled(RuntimeError):
    """A request stopped because its client has gone (cancelled, hung up, past its deadline) or the server stops."""


BUSY_PREFIX = "busy:"  # starts the message of every "busy, retry later" answer of the served models
RETRY_AFTER_S = 1  # what the fronts answer busy requests with (HTTP Retry-After, gRPC retry-after metadata)
# Abandoned requests: the launcher makes a cancel folder and names it to the stubs in CANCEL_DIR_ENV; each front
# request carries a token (request parameter TOKEN_PARAMETER) that its front writes as a file there when the
# client goes away, and SHUTDOWN_MARK there stops every request when the server shuts down
CANCEL_DIR_ENV, TOKEN_PARAMETER, SHUTDOWN_MARK = "BIVA_CANCEL_DIR", "biva_token", "shutdown"


# In flight: a request in a stub's execute() holds a shared lock on BUSY_FILE in the cancel folder. Triton counts a
# request only when it ends and keeps no count of the running ones, so this is how the supervisor knows that a stub
# is at work before it loads a model again to give memory back, or kills a stub that outlived its unload; the
# kernel drops the lock when the stub dies, so a dead stub never looks busy.
BUSY_FILE = "busy-{pid}.lock"


class InFlight:
    """`with InFlight(folder):` around a stub's execute(): marks this process at work (BUSY_FILE); a no-op without
    a cancel folder (Triton started without the launcher)."""

    def __init__(self, folder: str | None):
        self.f = open(os.path.join(folder, BUSY_FILE.format(pid=os.getpid())), "a") if folder else None

    def __enter__(self) -> InFlight:
        if self.f:
            fcntl.flock(self.f, fcntl.LOCK_SH)
        return self

    def __exit__(self, *exc) -> None:
        if self.f:
            fcntl.flock(self.f, fcntl.LOCK_UN)


def stub_busy(folder: str | Path | None, pid: int) -> bool:
    """Whether stub `pid` is inside an execute() (holds its InFlight lock); False without a folder or a mark."""
    if not folder:
        return False
    try:
        f = open(os.path.join(folder, BUSY_FILE.format(pid=pid)), "r")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


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
    check_rows(T.images, x, meta.image_shape, cap)
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
    return _check_count(T.n, n, caps.max_n, "max_n")


def check_iw(iw: int, caps: Caps) -> int:
    """Importance samples K per image."""
    return _check_count(T.iw, iw, caps.max_iw, "max_iw")


def check_ks(ks: np.ndarray, n_layers: int) -> np.ndarray:
    ks = np.asarray(ks).reshape(-1).astype(np.int64)
    if not 1 <= ks.size <= n_layers + 1 or ks.min() < 0 or ks.max() > n_layers:
        raise RequestError(f"ks: got {ks.tolist()[:8]}, expected 1 to {n_layers + 1} values, each in 0..{n_layers}")
    return ks


def parse_ks(text: str | None, n_layers: int) -> tuple[int, ...]:
    """A command line's k list: '1,2,3' -> (1, 2, 3) (sorted, duplicates dropped); None or '' -> 1..L-1, the
    informative k. RequestError naming the bad values otherwise."""
    if text is None or not text.strip():
        return tuple(range(1, n_layers))
    try:
        ks = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise RequestError(f"k: expected a comma-separated list of integers, got {text!r}") from None
    bad = [k for k in ks if not 0 <= k <= n_layers]
    if bad:
        raise RequestError(f"k: {bad} out of range, expected values in 0..{n_layers} (L = {n_layers})")
    return tuple(ks)


def check_seed(seed: int, what: str = T.seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= INT64_MAX:
        raise RequestError(f"{what}: expected an integer in 0..2^63-1, got {seed!r}")
    return int(seed)


def call_rows(feeds: dict[str, np.ndarray]) -> int:
    """Rows of one graph call: images x draws for the scorer (noise (B, S, N)), else its batch."""
    noise = feeds.get(T.noise)
    if noise is not None and noise.ndim == 3:
        return int(noise.shape[0] * noise.shape[1])
    return int(len(next(iter(feeds.values()))))


# The package runs a call of more rows in slices of at most AOTI_SLICE_ROWS rows: on the project machine (Xeon, 2
# threads) its 64-row calls ran at 0.75-0.87 of two 32-row calls, as small calls keep the activations in the caches
AOTI_SLICE_ROWS = 32


def row_slices(feeds: dict[str, np.ndarray], rows: int = AOTI_SLICE_ROWS) -> list[dict[str, np.ndarray]]:
    """A graph call's inputs in slices of whole images holding at most `rows` rows each (call_rows; at least one
    image a slice)."""
    per_image = max(1, call_rows(feeds) // max(1, len(next(iter(feeds.values())))))
    step = max(1, rows // per_image)
    n = len(next(iter(feeds.values())))
    return [{k: v[s:s + step] for k, v in feeds.items()} for s in range(0, n, step)]


Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def run_in_slices(run: Run, feeds: dict[str, np.ndarray], rows: int = AOTI_SLICE_ROWS, full: Run | None = None
                  ) -> list[np.ndarray]:
    """run(feeds) over row_slices, the outputs concatenated along the batch; a slice of exactly `rows` images goes
    to `full` instead where given (the package compiled for that batch: SLICE_PACKAGE_FILE)."""
    pick = lambda f: full if full is not None and len(next(iter(f.values()))) == rows else run  # noqa: E731
    parts = [pick(f)(f) for f in row_slices(feeds, rows)]
    return parts[0] if len(parts) == 1 else [np.concatenate(p, axis=0) for p in zip(*parts)]


def served_ranges(runtime: str, max_batch: int, slice_package: bool) -> list[dict]:
    """What a graph model runs each call size on (for the export report): row ranges -> runtime and file, and the
    package threads per instance each range needs (served_runtime)."""
    onnx = {"rows": f"1-{max_batch}", "runtime": "onnxruntime", "file": "model.onnx"}
    if runtime != "aoti":
        return [onnx]
    few, many = f"below {AOTI_MIN_THREADS}", f"{AOTI_MIN_THREADS} or more"  # package threads per instance
    out = [{**onnx, "threads": few},
           {"rows": f"1-{AOTI_MIN_ROWS - 1}", "threads": many, "runtime": "onnxruntime", "file": "model.onnx"},
           {"rows": f"{AOTI_MIN_ROWS}-{max_batch}", "threads": many, "runtime": "aoti", "file": PACKAGE_FILE,
            "slices_of_rows": AOTI_SLICE_ROWS}]
    if slice_package:
        out[2]["full_slices"] = {"images": AOTI_SLICE_ROWS, "file": SLICE_PACKAGE_FILE}
    return out


def served_runtime(runtime: str, rows: int, threads: int) -> str:
    """What a graph model whose package runs on `threads` threads runs a call of `rows` rows on: with the aoti
    runtime, the package from AOTI_MIN_ROWS rows and AOTI_MIN_THREADS threads; ONNX Runtime otherwise."""
    return "aoti" if runtime == "aoti" and rows >= AOTI_MIN_ROWS and threads >= AOTI_MIN_THREADS else "onnxruntime"


def check_graph_inputs(graph: str, feeds: dict[str, np.ndarray], meta: ModelMeta) -> None:
    """The inputs of one graph request (rows already within max_batch_size, shapes checked by Triton)."""
    caps, rows = meta.caps, meta.graph_max_batch
    for name, a in feeds.items():
        if name == T.images:
            check_images(a, meta, rows)
        elif name in (T.z, T.noise):  # the scorer's noise (B, S, N): B x S rows within the graph's max batch
            flat = a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a
            check_vectors(name, flat, flat.shape[-1] if flat.ndim == 2 else -1, rows, caps.max_abs_latent)
        elif name == T.k:
            check_k(T.k, a, meta.n_layers)
            if a.ndim == 2 and a.shape[1] > meta.n_layers + 1:
                raise RequestError(f"k: {a.shape[1]} values per row, expected at most {meta.n_layers + 1}")
        elif name == T.temperature:
            check_temperature(a, caps)
    lens = {a.shape[0] for a in feeds.values()}
    if len(lens) != 1:
        raise RequestError(f"{graph}: inputs have different row counts {sorted(lens)}")


# ---- noise ----------------------------------------------------------------------------------------
# ONNX Runtime's random ops give different draws on every run (and TensorRT ignores their seed), so every graph
# takes its noise as an input, drawn from the request's seed with numpy's PCG64 default_rng, in C order. A
# request's noise never travels over the network, and the same seed gives the same numbers in every runtime;
# draws are sequential, so taking (K, B, N) at once or in chunks of K yields the same values.


def noise_rng(seed: int | None) -> np.random.Generator:
    """The noise generator of one request (PyTorch's NoiseStream holds the same)."""
    return np.random.default_rng(seed)


def draw_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """The next standard normal float32 draws of `rng`, in C order."""
    return rng.standard_normal(shape, dtype=np.float32)


# ---- scoring: the estimators, L_K and the scorer calls ---------------------------------------------
# An estimator says how L_1 and each L^{>k} (eq. 2) of an image are estimated from draws of its latents:
#   sample  one random draw (the first), as the bounds' definitions: its L_1 and L^{>k} are bounds on log p(x)
#   mean    the mean of S random draws' log weights (common noise for L_1 and every L^{>k}, each draw with its
#           own L^{>k}): still bounds on log p(x) (a mean of lower bounds), with S times less variance
#   mode    every latent at its distribution's mean (all noise zero: posterior means above k, conditional-prior
#           means at and below k): deterministic, and a score, not a bound on log p(x)
# L_K is always the importance-weighted bound over K random draws (the first of them shared with the estimator).

ESTIMATORS = ("sample", "mean", "mode")
BOUND_ESTIMATORS = ("sample", "mean")  # whose L_1 and L^{>k} are lower bounds on log p(x)
DEFAULT_ESTIMATOR = "sample"  # biva_score's default: the bounds, as the likelihood commands report them
OOD_ESTIMATOR = "mode"  # the OOD commands' default: the best AUROC measured, and the cheapest (docs/ood.md)

# Rows (images x draws) per scorer call. Small calls keep the runtime's activations in the caches: default28's
# rows ran 1.4x faster per row in calls of 32 rows than in one call of 1000 (one thread, a Xeon with 2 MB of L2
# per core; 16 to 64 rows within 10% of the best). Each call runs the stages that see x alone once per image and
# costs a fixed few ms of per-node overhead, so much smaller calls lose more than the caches give.
IW_CALL_ROWS = 32
# Rows per graph call of the other front models (sample, regenerate, encode): small calls for the same reason, and
# each graph instance's memory arena grows only to what its largest call needs. A graph model runs a call of more
# than ARENA_KEEP_ROWS rows (a direct caller's, or calls the batcher merged) with ONNX Runtime's arena shrinkage,
# so its memory goes back after it (docs/serving.md: memory)
CALL_ROWS, ARENA_KEEP_ROWS = 64, 64
HEAVY_ROWS = 4096  # a score request costing more rows is heavy: at most instances - 1 of them run at once


@dataclass(frozen=True)
class ScoreRequest:
    """What one biva_score request asks for, checked (`check`)."""

    estimator: str = DEFAULT_ESTIMATOR  # one of ESTIMATORS
    samples: int = 1  # S, the draws "mean" averages (1 for "sample" and "mode")
    iw: int = 1  # K, the importance samples of L_K
    ks: tuple[int, ...] = ()  # the k of each L^{>k}
    want_iw: bool = True  # compute L_K (False: only the estimator's draws are made)

    @property
    def stat_draws(self) -> int:
        """Random draws that get L^{>k} and enter the estimator's mean (0 for mode)."""
        return 0 if self.estimator == "mode" else self.samples

    @property
    def random_draws(self) -> int:
        """Random draws per image taken from the request's noise stream, in order."""
        return max(self.stat_draws, self.iw if self.want_iw else 0)

    def rows(self, batch: int) -> int:
        """The request's cost in scorer rows: one per draw and image, and one more per k for the draws with ks."""
        with_ks = self.stat_draws + (self.estimator == "mode")
        return batch * (self.random_draws + (self.estimator == "mode") + with_ks * len(self.ks))

    def check(self, batch: int, meta: ModelMeta) -> ScoreRequest:
        caps = meta.caps
        if self.estimator not in ESTIMATORS:
            raise RequestError(f"estimator: got {self.estimator!r}, expected one of {', '.join(ESTIMATORS)}")
        if self.estimator == "mean":
            _check_count(T.samples, self.samples, caps.max_samples, "max_samples")
        elif self.samples != 1:
            raise RequestError(f"samples: got {self.samples}; estimator {self.estimator!r} takes one draw "
                               "(send samples = 1 or none, or use estimator 'mean' for the mean of S draws)")
        check_iw(self.iw, caps)
        if self.ks:
            check_ks(np.asarray(self.ks), meta.n_layers)
        rows = self.rows(batch)
        if rows > caps.max_rows:
            per = max(1, self.rows(1))
            raise RequestError(f"{T.iw}: this request costs {rows} scorer rows ({batch} images x {per} rows each: "
                               f"draws, and one more per k where L^{{>k}} is computed), over the cap max_rows = "
                               f"{caps.max_rows}; send at most {max(1, caps.max_rows // per)} images per request")
        return self


@dataclass(frozen=True)
class ScorerCall:
    """One scorer call of a request: images `images`, draws `draws` of the current block, with or without ks."""

    images: slice
    draws: slice  # within the block
    with_ks: bool


@dataclass(frozen=True)
class Block:
    """Draws of every image taken (and reduced) together: `start` .. `start + count` of the stream, or the one
    zero-noise pass of the mode estimator (start -1)."""

    start: int
    count: int
    with_ks: bool

    @property
    def mode(self) -> bool:
        return self.start < 0


def score_blocks(req: ScoreRequest, batch: int, graph_rows: int) -> list[Block]:
    """The request's blocks in stream order: the mode pass, then the draws with ks, then the rest of L_K's; each
    block holds at most max(1, graph_rows // batch) draws, so memory is one block's noise whatever K is."""
    per = max(1, graph_rows // batch)
    blocks = [Block(-1, 1, True)] if req.estimator == "mode" else []
    for lo, hi, with_ks in ((0, req.stat_draws, True), (req.stat_draws, req.random_draws, False)):
        blocks += [Block(s, min(per, hi - s), with_ks) for s in range(lo, hi, per)]
    return blocks


def iw_calls(draws: int, batch: int, rows: int = IW_CALL_ROWS) -> list[tuple[slice, slice]]:
    """(images, draws) slices of the scorer calls that cover `draws` draws of `batch` images with at most `rows`
    rows each: min(draws, rows) draws of as many images as fit (at least one)."""
    s = max(1, min(draws, rows))
    b = max(1, rows // s)
    return [(slice(i, min(i + b, batch)), slice(j, min(j + s, draws)))
            for j in range(0, draws, s) for i in range(0, batch, b)]


class LogMeanExp:
    """log (1/K) sum_k exp(a_k) per image, accumulated over blocks of rows (c, B): L_K from log weights.

    float64, with a running log-sum-exp, so memory is one block whatever K is (biva_core.objectives'
    evaluate_request in numpy)."""

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


class ScoreSums:
    """A request's running sums: the estimator's L_1, L^{>k} and KL (means over its draws, float64), and L_K."""

    def __init__(self, req: ScoreRequest, batch: int, groups: int):
        self.req, J = req, len(req.ks)
        self.l1, self.lgk, self.kl = np.zeros(batch), np.zeros((batch, J)), np.zeros((batch, groups))
        self.n = 0
        self.lme = LogMeanExp(batch)

    def add(self, block: Block, log_w: np.ndarray, log_w_gt_k: np.ndarray, kl: np.ndarray) -> None:
        """One block's outputs for every image: log_w (B, c), log_w_gt_k (B, c, J) (with ks), kl (B, c, G)."""
        if block.with_ks:  # the mode pass, or random draws of the estimator's mean
            self.l1 += log_w.sum(axis=1)
            self.lgk += log_w_gt_k.sum(axis=1)
            self.kl += kl.sum(axis=1)
            self.n += log_w.shape[1]
        if not block.mode and self.req.want_iw and block.start < self.req.iw:  # L_K's first K draws
            self.lme.add(log_w[:, :self.req.iw - block.start].T)

    def result(self) -> dict[str, np.ndarray]:
        n = max(self.n, 1)
        out = {T.elbo: self.l1 / n, T.l_gt_k: self.lgk / n, T.kl: self.kl / n}
        if self.req.want_iw:
            out[T.iw_bound] = self.lme.value()
        return {k: v.astype(np.float32) for k, v in out.items()}


ScorerFeeds = dict  # {T.images: (b, C, H, W), T.noise: (b, s, N), T.k: (b, J)}
ExecCalls = Callable[[list[ScorerFeeds], bool], list[tuple[np.ndarray, ...]]]  # (feeds, with_ks) -> outputs


def score_plan(req: ScoreRequest, batch: int, graph_rows: int) -> list[tuple[Block, list[tuple[slice, slice]]]]:
    """Every block of the request and its scorer calls ((images, draws within the block) slices), in order: what
    run_score runs and the bench counts."""
    call_rows = min(IW_CALL_ROWS, graph_rows)
    return [(b, iw_calls(b.count, batch, call_rows)) for b in score_blocks(req, batch, graph_rows)]


def run_score(req: ScoreRequest, x: np.ndarray, rng: np.random.Generator, noise_dim: int, graph_rows: int,
              groups: int, exec_calls: ExecCalls, check: Callable[[], None] = lambda: None) -> dict[str, np.ndarray]:
    """One biva_score request on the scorer: the estimator's L_1, L^{>k} and KL per image and, if asked, L_K.

    Random draws come from `rng` in stream order ((K, B, N) in blocks); every block's scorer calls go through
    `exec_calls(feeds, with_ks)` -> [(log_w, log_w_gt_k, kl)] (log_w alone for calls without ks), so the front
    models (BLS), the export's validation and the bench (in process) run the same plan. `check()` runs before
    every block: it raises to stop the request (a cancelled request, a shutting-down server)."""
    B = x.shape[0]
    sums, ks = ScoreSums(req, B, groups), np.asarray(req.ks, np.int64)
    for block, plan in score_plan(req, B, graph_rows):
        check()
        c = block.count
        eps = np.zeros((c, B, noise_dim), np.float32) if block.mode else draw_noise(rng, (c, B, noise_dim))
        noise = eps.transpose(1, 0, 2)  # (B, c, N): an image's draws along the scorer's sample axis
        feeds = [{T.images: x[imgs], T.noise: noise[imgs, drw],
                  T.k: np.tile(ks, (imgs.stop - imgs.start, 1)) if block.with_ks
                  else np.zeros((imgs.stop - imgs.start, 0), np.int64)} for imgs, drw in plan]
        log_w, lgk, kl = np.empty((B, c)), np.empty((B, c, len(ks))), np.empty((B, c, groups))
        for (imgs, drw), outs in zip(plan, exec_calls(feeds, block.with_ks)):
            log_w[imgs, drw] = outs[0]
            if block.with_ks:
                lgk[imgs, drw], kl[imgs, drw] = outs[1], outs[2]
        sums.add(block, log_w, lgk, kl)
    return sums.result()


# ---- serving ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingConfig:
    """How the graph and front models are served (biva-export's options, written into every config.pbtxt)."""

    backend: str = "python"  # "python" (ONNX Runtime in the python backend) or "onnxruntime" (native, GPU)
    max_batch: int = 1024  # rows per graph call: max_batch_size of the graph models
    # instances per graph model. Two, not one with all threads: Triton 2.51's dynamic batcher with a queue policy
    # (graph_queue below) misses the wake-up when a lone instance frees up, so requests that arrive then wait
    # its 500 ms timeout; with two the other instance takes them (docs/speed.md: batching)
    instances: int = 2
    front_instances: int = 2  # instances per front (API) model
    threads: int = 0  # ONNX Runtime intra-op threads per python-backend graph instance (0: cores / instances)
    # the package's threads per instance (0: as ONNX Runtime's, the instance's share of the cores). Every core per
    # instance ran a lone direct 64-row call faster, but two at once fell to half (OpenMP's threads spin-wait and take
    # the cores from each other) and the front models' requests, which use both instances, slowed by 10-35%; with
    # OpenMP's threads asleep when idle (OMP_WAIT_POLICY=PASSIVE) the package itself ran 1.2-2x slower
    # (docs/speed.md: threads)
    aoti_threads: int = 0
    # what runs the python backend's graphs: "aoti", the AOTInductor packages from AOTI_MIN_ROWS rows on instances of
    # AOTI_MIN_THREADS package threads or more and ONNX Runtime for the rest (the fastest measured: docs/speed.md), or
    # "onnxruntime" alone (export in seconds instead of minutes)
    runtime: str = "aoti"
    spinning: bool = False  # idle ONNX Runtime intra-op threads busy-wait for work (ORT's default; no faster
    #                         served, measured: docs/speed.md)
    dynamic_batching: bool = True  # the graph models batch concurrent calls (False: one call per execution)
    # dynamic batcher preferred batch sizes (none: batch what has arrived). A full slice: the batcher then merges
    # queued calls only up to 32 rows, so the two halves a front model sends to both instances at once stay apart
    # (without it, 5 of 20 64-image biva_sample requests ran both halves on one instance while the other idled,
    # and their mean latency was 1.2x the median); a larger call still runs alone. biva-export --backend
    # onnxruntime (the GPU route) leaves it out.
    preferred: tuple[int, ...] = (AOTI_SLICE_ROWS,)
    # dynamic batcher: longest a request waits for others to join its batch. 0: an idle instance takes what is
    # queued at once (under load the queue still forms batches: 16 clients 0.93-0.97 of the ceiling vs 0.94 with
    # 500 us); a delay merges the calls a front model sends to both instances at once into one instance's batch
    queue_delay_us: int = 0
    front_queue: int = 8  # requests waiting per front model beyond those running; more are refused as busy
    front_queue_timeout_us: int = 1_000_000  # longest a front request waits for an instance, then "busy"
    graph_queue: int = 256  # requests waiting per graph model (front models' slices and direct callers)


def package_threads(sc: ServingConfig, cores: int) -> int:
    """The package threads each graph instance of this layout runs on a machine of `cores` usable cores, as the graph
    model works them out at load: aoti_threads, else the ONNX Runtime threads, else the cores shared out between the
    instances. Below AOTI_MIN_THREADS the instance serves ONNX Runtime alone (served_runtime)."""
    return sc.aoti_threads or sc.threads or max(1, cores // max(1, sc.instances))


# ---- runtimes -----------------------------------------------------------------------------------

ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime session options beyond the model file."""

    threads: int = 0  # intra-op threads (0: all cores)
    level: str = "all"  # graph optimisation level (ORT_LEVELS)
    gpu_device: int | None = None  # the CUDA provider on this device, where onnxruntime-gpu has it
    saved_graph: str | None = None  # also write the optimised graph here
    spinning: bool | None = None  # idle intra-op threads busy-wait for work (None: ONNX Runtime's default, on)


def ort_session(path: str, options: OrtOptions = OrtOptions()):
    """The one ONNX Runtime session builder (validation, bench and the python-backend graph models): one inter-op
    thread and `options`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if options.threads:
        opts.intra_op_num_threads = options.threads
    if options.spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spinning else "0")
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[options.level])
    if options.saved_graph:
        opts.optimized_model_filepath = str(options.saved_graph)
    providers: list = ["CPUExecutionProvider"]
    if options.gpu_device is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": options.gpu_device}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), opts, providers=providers)


def cpu_info() -> tuple[str, set[str]]:
    """This machine's processor name and its instruction-set flags, from /proc/cpuinfo ("", {} elsewhere)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name, flags


def check_package_isa(model: str, isa: dict) -> None:
    """RuntimeError (one line, naming both processors) when this machine lacks an instruction set a model's
    AOTInductor package was compiled for (isa: PACKAGE_ISA_PARAMETER's value)."""
    name, flags = cpu_info()
    missing = sorted(set(isa.get("flags", ())) - flags)
    if missing:
        raise RuntimeError(f"{model}: its AOTInductor package was compiled on {isa.get('cpu') or 'another processor'} "
                           f"for {', '.join(isa['flags'])}; this machine's processor ({name or 'unknown'}) lacks "
                           f"{', '.join(missing)}: export the repository again on this machine (biva-export), or "
                           "with --runtime onnxruntime")


def ort_shrinking_run():
    """ONNX Runtime RunOptions that give the CPU arena's unused memory back at the end of the run."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


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
