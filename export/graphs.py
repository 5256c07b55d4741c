"""The three exported graphs and their specs: one spec per graph holds tensor names, dtypes, per-row
shapes and validation tolerances; the ONNX export arguments and every config.pbtxt are generated from it.

All tensors have a leading dynamic batch dimension (one row per image / latent vector). Per-row scalars
(k, temperature) are (B, 1), which is what Triton's batcher hands over for `dims: [1]`, so requests with
different k or temperature can share one batch.

    sampler  (z, k, temperature, noise)  -> (images, z_out)
             z_>k kept from `z` (flat layout), z_<=k drawn from the conditional prior with `noise`;
             k = L samples unconditionally (z is then ignored). Figure 12 when 0 < k < L.
    encoder  (images, noise)             -> (z, q_mu, q_log_std, kl, log_w)
             log_w = log p(x, z) - log q(z | x) for the z drawn: one importance sample of L_K.
    scorer   (images, noise, k)          -> (log_w, log_w_gt_k, kl)
             noise (B, S, N): S draws of the latents per image; k (B, J): J values of k per image (J may
             be 0). For every draw: its log w (B, S), the log w of its L^{>k} (eq. 2) for each k (B, S, J),
             sharing its noise, and its KL per group (B, S, G). Noise zero is the mode estimator (every
             latent at its mean). The bottom-up stages that see x alone run once per image, so biva_score
             runs every estimator and L_K here, several draws per image and call (scoring.run_score).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from biva_core.model import Biva
from biva_core.objectives import draw_log_weights

from biva_core import contract
from biva_core.contract import EncoderOut, GraphSpec, SamplerOut, ScorerOut


class SamplerGraph(nn.Module):
    def __init__(self, model: Biva):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor, noise: torch.Tensor):
        out = self.model.top_down(None, noise, k, temperature, z_given=z)
        return SamplerOut(images=out.x_mean, z_out=out.z)


class EncoderGraph(nn.Module):
    def __init__(self, model: Biva):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, noise: torch.Tensor):
        out = self.model(images, noise)
        return EncoderOut(z=out.z, q_mu=out.q_mu, q_log_std=out.q_log_std, kl=out.kl, log_w=out.log_w.unsqueeze(1))


class ScorerGraph(nn.Module):
    def __init__(self, model: Biva):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, noise: torch.Tensor, k: torch.Tensor):
        log_w, log_w_gt_k, kl = draw_log_weights(self.model, images, noise, k)
        return ScorerOut(log_w=log_w, log_w_gt_k=log_w_gt_k, kl=kl)  # (B, S), (B, S, J), (B, S, G)


GRAPH_MODULES = {contract.SAMPLER: SamplerGraph, contract.ENCODER: EncoderGraph, contract.SCORER: ScorerGraph}


def graph_specs(model: Biva) -> dict[str, GraphSpec]:
    """The specs of the three graphs for this model's sizes (contract.graph_specs)."""
    return contract.graph_specs(tuple(model.cfg.image_shape), model.latent_dim, model.noise_dim, len(model.groups))


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
