"""BIVA configuration: one frozen dataclass, presets as data.

A model is a list of stochastic stages. Stage i holds the M ResNet layers
between stochastic layer i-1 and i (Appendix B, networks g_i / f_i) and the
latent variable z_i. Presets follow Appendix C of the paper.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

VARIANTS = ("biva", "lvae+", "lvae")  # Table 1 ablations, same code
LIKELIHOODS = ("bernoulli", "dmol")


@dataclass(frozen=True)
class StageSpec:
    channels: int  # feature maps of the stage's M conv layers
    kernel: int  # conv kernel width = height
    stride: int  # overall stride of the stage (1 or 2), applied by its first layer
    z_dim: int  # latent units (dense) or latent feature maps (conv)
    dense: bool = True  # densely connected latent (binary nets) or convolutional (natural nets)
    latent_kernel: int = 3  # conv latents: kernel of the q / p heads (natural presets: the latent's own
    #                         resolution, Appendix C and the authors' code; even kernels pad as TF's SAME)


@dataclass(frozen=True)
class BivaConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of the data
    likelihood: str = "bernoulli"  # "bernoulli" for binary images, "dmol" for 8-bit images
    n_mixtures: int = 10  # logistic mixture components (dmol only)
    stages: tuple[StageSpec, ...] = ()  # stochastic layers 1..L, bottom first
    m_layers: int = 3  # ResNet layers M per stage
    variant: str = "biva"  # "biva", "lvae+" (skip path, no BU latents), "lvae" (neither)
    dropout_inf: float = 0.5  # dropout in the inference network's deterministic layers
    dropout_gen: float = 0.5  # dropout in the generative network's deterministic layers
    dense_bottleneck: int = 0  # dense latents: 1x1 conv to this many maps around the dense layers (0: none, as the paper)
    min_std: float = 1e-3  # std = softplus(raw) + min_std: any std in (min_std, inf), below 1 included
    q_td_path: bool = False  # a second deterministic inference path h^TD beside h (the authors' code), merged
    #                          with d_i by a gated layer before q(z_i^TD) and with h_L before q(z_L);
    #                          False: q(z_i^TD | <h_i; d_i>) as eq. (10)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if len(self.stages) < 2:
            raise ValueError(f"need at least 2 stochastic layers, got {len(self.stages)}")
        if self.m_layers < 1:
            raise ValueError(f"m_layers must be >= 1, got {self.m_layers}")
        c, h, w = self.image_shape
        for i, s in enumerate(self.stages, 1):
            if s.stride not in (1, 2):
                raise ValueError(f"stage {i}: stride must be 1 or 2, got {s.stride}")
            if s.latent_kernel < 1:
                raise ValueError(f"stage {i}: latent_kernel must be >= 1, got {s.latent_kernel}")
            if h % s.stride or w % s.stride:
                raise ValueError(f"stage {i}: resolution {h}x{w} is not divisible by stride {s.stride}")
            h, w = h // s.stride, w // s.stride

    @property
    def n_layers(self) -> int:
        """L, the number of stochastic layers."""
        return len(self.stages)

    @property
    def bu_latents(self) -> bool:
        """Whether layers 1..L-1 carry a bottom-up latent z_i^BU (BIVA only)."""
        return self.variant == "biva"

    @property
    def skip(self) -> bool:
        """Whether the deterministic skip paths d_{i,j} <- d_{i+1,j} are used."""
        return self.variant != "lvae"

    def resolutions(self) -> list[tuple[int, int]]:
        """(H, W) after each stage; index 0 is the image."""
        _, h, w = self.image_shape
        out = [(h, w)]
        for s in self.stages:
            h, w = h // s.stride, w // s.stride
            out.append((h, w))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BivaConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        d = dict(d)
        if "stages" in d:
            d["stages"] = tuple(s if isinstance(s, StageSpec) else StageSpec(**s) for s in d["stages"])
        if "image_shape" in d:
            d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


def _binary28() -> BivaConfig:
    # Appendix C, binary images: L=6, g_1 = 3 x 64x5x5 with overall stride 2, g_2..g_6 = 3 x 64x3x3,
    # g_6 strided; dense latents 48, 40, 32, 24, 16, 8; dropout 0.5 in both networks.
    dims = (48, 40, 32, 24, 16, 8)
    stages = [StageSpec(64, 5, 2, dims[0])]
    stages += [StageSpec(64, 3, 2 if i == 5 else 1, d) for i, d in enumerate(dims[1:], 2)]
    return BivaConfig(image_shape=(1, 28, 28), stages=tuple(stages), m_layers=3, dropout_inf=0.5, dropout_gen=0.5)


def _natural32() -> BivaConfig:
    # Appendix C, 32x32: L=15, g_1 = 3 x 96x5x5 stride 2, g_2..g_15 = 3 x 96x3x3, 11 and 15 strided;
    # conv latents with 38, 36, ..., 10 feature maps whose q / p heads have kernels as wide as the latent
    # (16x16 at layers 1-10, 8x8 at 11-14, 4x4 at 15: Appendix C, and get_deep_vae_cifar in biva-pytorch
    # and in the TF code); the authors' second inference path and merge layers; dropout 0.2 in inference.
    # Built here: biva 102.85M parameters, lvae+ 72.01M, lvae 70.89M (Table 1: 102.95M, 73.35M, 72.36M).
    def spec(i: int) -> StageSpec:
        stride = 2 if i in (1, 11, 15) else 1
        return StageSpec(96, 5 if i == 1 else 3, stride, 40 - 2 * i, dense=False,
                         latent_kernel=16 if i <= 10 else 8 if i <= 14 else 4)

    return BivaConfig(image_shape=(3, 32, 32), likelihood="dmol", stages=tuple(spec(i) for i in range(1, 16)),
                      m_layers=3, dropout_inf=0.2, dropout_gen=0.0, q_td_path=True)


def _tiny32() -> BivaConfig:
    # For tests of the natural-image path: natural32's structure (32x32x3, coupled logistic mixture, even
    # 16x16 / 8x8 latent kernels, second inference path and merges) at a width that runs in milliseconds.
    stages = (StageSpec(8, 3, 2, 4, dense=False, latent_kernel=16),
              StageSpec(8, 3, 1, 3, dense=False, latent_kernel=16),
              StageSpec(8, 3, 2, 2, dense=False, latent_kernel=8))
    return replace(_natural32(), stages=stages, m_layers=1, n_mixtures=3, dropout_inf=0.0)


def _natural64() -> BivaConfig:
    # Appendix C, 64x64: L=20, g_1 = 64x7x7 s2, g_2 = 64x5x5 s2, g_3..g_11 = 64x3x3 (11 strided),
    # g_12..g_20 = 128x3x3 (20 strided); conv latents 20, 19, ..., 1 with head kernels as wide as the
    # latent (32, 16, 8, 4: Appendix C's rule); dropout 0.2 in inference. Neither of the authors' repositories
    # has a 64x64 configuration, so the rest (second inference path, merges) follows their 32x32 one.
    def spec(i: int) -> StageSpec:
        kernel = {1: 7, 2: 5}.get(i, 3)
        stride = 2 if i in (1, 2, 11, 20) else 1
        latent_kernel = 32 if i == 1 else 16 if i <= 10 else 8 if i <= 19 else 4
        return StageSpec(64 if i <= 11 else 128, kernel, stride, 21 - i, dense=False, latent_kernel=latent_kernel)

    return BivaConfig(image_shape=(3, 64, 64), likelihood="dmol", stages=tuple(spec(i) for i in range(1, 21)),
                      m_layers=3, dropout_inf=0.2, dropout_gen=0.0, q_td_path=True)


def _default28() -> BivaConfig:
    # The shipped default: binary28's shape (dense latents, strides at layers 1 and L) made small enough to
    # train on a 2-core CPU in about an hour and a half: 32 maps, 3x3 kernels, M = 2, L = 5, and a 1x1
    # bottleneck to 8 maps around the dense latent layers (keeps the checkpoint under 25 MB).
    dims = (32, 24, 16, 12, 8)
    stages = [StageSpec(32, 3, 2, dims[0])]
    stages += [StageSpec(32, 3, 2 if i == len(dims) else 1, d) for i, d in enumerate(dims[1:], 2)]
    return replace(_binary28(), stages=tuple(stages), m_layers=2, dense_bottleneck=8, dropout_inf=0.1,
                   dropout_gen=0.0)


def _ood28() -> BivaConfig:
    # The OOD model (the OOD study, docs/ood.md): hvae-oodd's latent shape (Havtorn et al., 2021) as a BIVA, a
    # convolutional bottom latent of 8 maps at 14x14, then dense latents of 16 (at 7x7) and 8; 48 maps,
    # default28's other settings. 0.95 M parameters, 1.4x default28's training images/s on this CPU.
    stages = (StageSpec(48, 3, 2, 8, dense=False), StageSpec(48, 3, 2, 16), StageSpec(48, 3, 1, 8))
    return replace(_default28(), stages=stages)


def _tiny() -> BivaConfig:
    # For tests: seconds on a CPU.
    stages = (StageSpec(8, 3, 2, 6), StageSpec(8, 3, 1, 4), StageSpec(8, 3, 2, 2))
    return BivaConfig(image_shape=(1, 28, 28), stages=stages, m_layers=1, dropout_inf=0.0, dropout_gen=0.0)


PRESETS = {
    "binary28": _binary28,
    "natural32": _natural32,
    "natural64": _natural64,
    "tiny32": _tiny32,
    "default28": _default28,
    "ood28": _ood28,
    "tiny": _tiny,
}


def preset(name: str, **overrides: Any) -> BivaConfig:
    """A preset by name, with fields overridden; unknown names and keys fail loudly."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return BivaConfig.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg
