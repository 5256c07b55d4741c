"""Small distribution classes: log_prob, kl, sample(eps, temperature). Noise can always be handed in."""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) written as max(x, 0) + log1p(exp(-|x|)): exact for every x in float32, and it
    exports to plain ONNX ops. (The tracing exporter turns BCE-with-logits into log(sigmoid(x)), which is
    -inf for confident logits: the export validation caught it on the trained model.)"""
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-torch.abs(x)))


class DiagGaussian:
    """N(mu, diag(std^2)); log_std kept alongside std so no log is taken twice."""

    def __init__(self, mu: torch.Tensor, std: torch.Tensor):
        self.mu = mu
        self.std = std
        self.log_std = torch.log(std)

    @classmethod
    def from_raw(cls, raw: torch.Tensor, min_std: float, dim: int = 1) -> "DiagGaussian":
        """Split raw network output into mean and std = softplus(.) + min_std (any std > min_std)."""
        mu, s = raw.chunk(2, dim=dim)
        return cls(mu, softplus(s) + min_std)

    @classmethod
    def standard(cls, like: torch.Tensor) -> "DiagGaussian":
        return cls(torch.zeros_like(like), torch.ones_like(like))

    def map(self, f) -> "DiagGaussian":
        """The same distribution with `f` (a row selection or repetition) applied to its parameters."""
        return DiagGaussian(f(self.mu), f(self.std))

    def sample(self, eps: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Reparameterised draw mu + temperature * std * eps (temperature scales the std, Figs. 10-11)."""
        return self.mu + temperature * self.std * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Elementwise log density."""
        return -0.5 * (((z - self.mu) / self.std) ** 2 + LOG_2PI) - self.log_std

    def kl(self, other: "DiagGaussian") -> torch.Tensor:
        """Elementwise KL(self || other), analytic."""
        var_ratio = (self.std / other.std) ** 2
        return other.log_std - self.log_std + 0.5 * (var_ratio + ((self.mu - other.mu) / other.std) ** 2 - 1.0)


class Bernoulli:
    """Bernoulli likelihood over binary pixels, parameterised by logits."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x log sigmoid(l) + (1 - x) log sigmoid(-l) = x l - softplus(l), stable for any logit."""
        return x * self.logits - softplus(self.logits)

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @staticmethod
    def n_params(channels: int, n_mixtures: int) -> int:
        return channels


class DiscretizedLogisticMixture:
    """Discretised logistic mixture over 8-bit pixels with PixelCNN++'s linear channel coupling
    (Salimans et al., 2017, section 2.2), the likelihood of the paper's natural-image models.

    Per pixel: M mixture weights shared by the channels; per component and channel a location and a log
    scale (clamped at -7); per component C(C-1)/2 coupling coefficients (tanh, in (-1, 1)), so that given
    the component the mean of channel c is loc_c + sum_{j<c} a_{c,j} x_j: the channels are autoregressive
    within a pixel, and p(x_pixel) = sum_k pi_k prod_c p(x_c | x_<c, k). Pixels are in [0, 1] with 256
    bins; the edge bins 0 and 255 take the logistic's whole tail. Channel layout of `params`:
    [logit_pi (M) | loc (M, C) | log_scale (M, C) | coeff (M, C(C-1)/2)], coefficients ordered
    (1, 0), (2, 0), (2, 1), ..., as PixelCNN++.
    """

    bins = 256

    def __init__(self, params: torch.Tensor, channels: int, n_mixtures: int):
        b, _, h, w = params.shape
        m, c = n_mixtures, channels
        self.channels = c
        self.logit_pi = params[:, :m]  # (B, M, H, W)
        self.loc = params[:, m:m + m * c].reshape(b, m, c, h, w)  # (B, M, C, H, W), in [-1, 1] units
        self.log_scale = torch.clamp(params[:, m + m * c:m + 2 * m * c].reshape(b, m, c, h, w), min=-7.0)
        self.coeff = torch.tanh(params[:, m + 2 * m * c:].reshape(b, m, c * (c - 1) // 2, h, w))

    def _coupled(self, xs: torch.Tensor) -> torch.Tensor:
        """loc_c + sum_{j<c} a_{c,j} xs_j for every channel: (B, M, C, H, W). xs: (B, 1 or M, C, H, W)."""
        means, k = [], 0
        for c in range(self.channels):
            mu = self.loc[:, :, c]
            for j in range(c):
                mu = mu + self.coeff[:, :, k] * xs[:, :, j]
                k += 1
            means.append(mu)
        return torch.stack(means, dim=2)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel log p, (B, H, W): sums over channels inside each component, then log-sum-exp."""
        xs = (x * 2.0 - 1.0).unsqueeze(1)  # (B, 1, C, H, W) in [-1, 1]
        half = 1.0 / (self.bins - 1)
        centred = xs - self._coupled(xs)
        inv_s = torch.exp(-self.log_scale)
        plus = inv_s * (centred + half)
        minus = inv_s * (centred - half)
        log_cdf_plus = plus - softplus(plus)  # log F(x+) for the x = 0 edge
        log_one_minus_cdf_minus = -softplus(minus)  # log(1 - F(x-)) for the x = 255 edge
        # log(F(x+) - F(x-)) for the inner bins, in log space on the tail side of the mean (above it as
        # (1 - F(x-)) - (1 - F(x+))): log F(hi) + log(1 - exp(d)), d = log F(lo) - log F(hi) < 0, and
        # 1 - exp(d) = -2t / (1 - t) with t = tanh(d / 2). PixelCNN++ subtracts the two CDFs and falls back
        # to density x width below 1e-5: in float32 that loses up to 1e-3 nats per sub-pixel in the tails,
        # differently in each runtime; this form keeps every term's relative precision.
        above = inv_s * centred > 0
        hi = torch.where(above, -minus, plus)
        lo = torch.where(above, -plus, minus)
        log_f_hi = -softplus(-hi)
        t = torch.tanh(-0.5 * (softplus(-lo) + log_f_hi))  # tanh(d / 2), in (-1, 0)
        inner = log_f_hi + torch.log(torch.clamp(-2.0 * t, min=1e-30)) - torch.log1p(-t)
        lp = torch.where(xs < -0.999, log_cdf_plus, torch.where(xs > 0.999, log_one_minus_cdf_minus, inner))
        lp = lp.sum(dim=2) + torch.log_softmax(self.logit_pi, dim=1)  # (B, M, H, W)
        return torch.logsumexp(lp, dim=1)

    def mean(self) -> torch.Tensor:
        """Mixture mean per channel, in [0, 1]: (B, C, H, W). Given a component, E[x_c] follows the coupling
        with E[x_j] in place of x_j (exact for the logistic; the clipping at the edge bins is ignored)."""
        e = []
        for c in range(self.channels):  # E[x_c | k], recursively: (B, M, H, W)
            k0 = c * (c - 1) // 2
            mu = self.loc[:, :, c]
            for j in range(c):
                mu = mu + self.coeff[:, :, k0 + j] * e[j]
            e.append(mu)
        pi = torch.softmax(self.logit_pi, dim=1).unsqueeze(2)  # (B, M, 1, H, W)
        return torch.clamp(((pi * torch.stack(e, dim=2)).sum(dim=1) + 1.0) / 2.0, 0.0, 1.0)

    @staticmethod
    def n_params(channels: int, n_mixtures: int) -> int:
        return n_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)
