"""The serving contract: what the exporter writes, the served models read, the client sends and the bench times.

The bottom layer of the project, numpy only, imported under one name, `biva_core.contract`, from the source tree,
the installed package and the generated model repository (biva-export copies it beside every python-backend
model.py, with the other modules the served code imports: export/repository.py's SERVED_CORE). It holds the names
(graph and front models, config parameters, estimators, every tensor name on the wire: `T`); the tensor specs of
every served model, and the graphs' outputs as named tuples; the request caps and the metadata record
(`ModelMeta`) every config.pbtxt carries; the request checks shared by the served models and the client, and the
busy answer's protocol; the seed -> noise stream (biva_core.noise wraps it for
PyTorch). What is done with them lives beside it: scoring.py (a biva_score request's plan and reduction),
routing.py (a graph call's slices and runtime, and the graph models' config parameters), inflight.py (which stub
is at work, the cancel folder), runtimes.py (the loaders).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

# ---- names ----------------------------------------------------------------------------------------

SAMPLER, ENCODER, SCORER = "biva_graph_sampler", "biva_graph_encoder", "biva_graph_scorer"
GRAPHS = (SAMPLER, ENCODER, SCORER)
MODEL_PREFIX = "biva_"  # front model name = prefix + role
ROLES = ("sample", "regenerate", "encode", "score", "detect")
SAMPLE, REGENERATE, ENCODE, SCORE, DETECT = (MODEL_PREFIX + r for r in ROLES)  # the front (API) models
FRONT_GRAPHS = {SAMPLE: (SAMPLER,), REGENERATE: (SAMPLER,), ENCODE: (ENCODER,), SCORE: (SCORER,),
                DETECT: (SCORER,)}
META_PARAMETER = "biva_meta"  # config.pbtxt parameter holding ModelMeta.to_json()
DETECTOR_PARAMETER = "biva_detector"  # biva_detect's parameter: the deployed detector's summary (no points)
ROLE_PARAMETER = "role"  # config.pbtxt parameter naming a front model's role
GRAPH_INSTANCES_PARAMETER = "graph_instances"  # a front model's parameter: instances of each graph model
DETECTOR_FILE = "detector.json"  # beside biva_detect's model.py: the fitted detector (biva_core.stats.Detector)
REPORT = "export_report.json"  # written by biva-export at the repository's root
# the estimators of L_1 and L^{>k} a biva_score request may name (what each computes: biva_core.scoring)
ESTIMATORS = ("sample", "mean", "mode")
DEFAULT_ESTIMATOR = "sample"  # biva_score's default: the bounds, as the likelihood commands report them
OOD_ESTIMATOR = "mode"  # the OOD commands' default: the best AUROC measured, and the cheapest (docs/ood.md)


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


_f32, _i64 = partial(_t, "float32"), partial(_t, "int64")


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


def check_samples(samples: int, caps: Caps) -> int:
    """Draws S per image of the "mean" estimator."""
    return _check_count(T.samples, samples, caps.max_samples, "max_samples")


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
