"""The three exported graphs and their specs: one spec per graph holds tensor names, dtypes, per-row
shapes and validation tolerances; the ONNX export arguments and every config.pbtxt are generated from it.

All tensors have a leading dynamic batch dimension (one row per image / latent vector). Per-row scalars
(k, temperature) are (B, 1), which is what Triton's batcher hands over for `dims: [1]`, so requests with
different k or temperature can share one batch.

    sampler  (z, k, temperature, noise)  -> (images, z_out)
             z_>k kept from `z` (flat layout), z_<=k drawn from the conditional prior with `noise`;
             k = L samples unconditionally (z is then ignored). Figure 12 when 0 < k < L.
    encoder  (images, noise)             -> (z, q_mu, q_log_std, kl, log_w)
             log_w = log p(x, z) - log q(z | x) for the z drawn: one importance sample of L_K. Rows
             2..K of an IW likelihood run here, a single top-down pass; the scorer's second pass
             (for L^{>k}) is only needed once per image.
    scorer   (images, noise, k)          -> (log_w, log_w_gt_k, kl)
             one importance sample per row: log w of L_1 and of L^{>k} (eq. 2), sharing noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from biva_core.model import Biva
from biva_core.objectives import log_weights


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" or "int64"
    dims: tuple[int, ...]  # per-row shape, without the batch dimension


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


IMAGE_ATOL = 1e-4  # images and latents
NATS_ATOL = 1e-3  # every log-likelihood output, in nats


class SamplerGraph(nn.Module):
    def __init__(self, model: Biva):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor, noise: torch.Tensor):
        out = self.model.top_down(None, noise, k, temperature, z_given=z)
        return out.x_mean, out.z


class EncoderGraph(nn.Module):
    def __init__(self, model: Biva):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, noise: torch.Tensor):
        out = self.model(images, noise)
        return out.z, out.q_mu, out.q_log_std, out.kl, out.log_w.unsqueeze(1)


class ScorerGraph(nn.Module):
    def __init__(self, model: Biva):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, noise: torch.Tensor, k: torch.Tensor):
        log_w, log_w_gt_k, kl = log_weights(self.model, images, noise, k)
        return log_w.unsqueeze(1), log_w_gt_k.unsqueeze(1), kl  # (B, 1), (B, 1), (B, G)


GRAPH_MODULES = {"biva_sampler": SamplerGraph, "biva_encoder": EncoderGraph, "biva_scorer": ScorerGraph}


def graph_specs(model: Biva) -> dict[str, GraphSpec]:
    """The specs of the three graphs for this model's sizes."""
    img = tuple(model.cfg.image_shape)
    D, N, G = model.latent_dim, model.noise_dim, len(model.groups)
    f32 = lambda name, *dims: TensorSpec(name, "float32", tuple(dims))  # noqa: E731
    i64 = lambda name, *dims: TensorSpec(name, "int64", tuple(dims))  # noqa: E731
    return {
        "biva_sampler": GraphSpec(
            "biva_sampler",
            (f32("z", D), i64("k", 1), f32("temperature", 1), f32("noise", D)),
            (f32("images", *img), f32("z_out", D)),
            {"images": IMAGE_ATOL, "z_out": IMAGE_ATOL}),
        "biva_encoder": GraphSpec(
            "biva_encoder",
            (f32("images", *img), f32("noise", N)),
            (f32("z", D), f32("q_mu", D), f32("q_log_std", D), f32("kl", G), f32("log_w", 1)),
            {"z": IMAGE_ATOL, "q_mu": IMAGE_ATOL, "q_log_std": IMAGE_ATOL, "kl": NATS_ATOL, "log_w": NATS_ATOL}),
        "biva_scorer": GraphSpec(
            "biva_scorer",
            (f32("images", *img), f32("noise", N), i64("k", 1)),
            (f32("log_w", 1), f32("log_w_gt_k", 1), f32("kl", G)),
            {"log_w": NATS_ATOL, "log_w_gt_k": NATS_ATOL, "kl": NATS_ATOL}),
    }


def inference_copy(model: Biva) -> Biva:
    """A fresh model in eval mode with weight norm folded into plain weights (same values, no norm
    recomputed at run time). Built anew rather than deep-copied: parametrised modules do not copy."""
    plain = Biva(model.cfg).eval()
    for module in plain.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    src = model.state_dict()
    state = {}
    with torch.no_grad():
        for key in plain.state_dict():
            if key in src:
                state[key] = src[key]
            else:  # "<module>.weight": the parametrised module computes g * v / |v|
                state[key] = model.get_submodule(key.rsplit(".", 1)[0]).weight.detach().clone()
    plain.load_state_dict(state)
    return plain
