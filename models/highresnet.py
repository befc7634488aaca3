"""HighRes-net: multi-frame super-resolution by recursive fusion (Deudon et al., arXiv 2002.06460).

Every frame is paired with a shared anchor, the pixel-wise median of the first 9 frames, and the
pair is encoded by a small residual CNN. The per-frame features are then fused pairwise, halving
the number of frames at each step (frame i with frame 2*half-1-i), until one remains; a pair whose
second frame is padding (alpha 0) keeps its first frame unchanged. A transposed convolution with
stride 3 and a 1x1 convolution decode the fused features into the SR image.

Checkpoint-compatible with the authors' implementation (ServiceNow/HighRes-net, ``HRNet``):
same parameter names, shapes and numerics. The encoder and decoder defined here have the same
layout in MISR-GRU and TR-MISR, which import them (:mod:`models.misrgru`, :mod:`models.trmisr`),
as do the helpers that map the authors' nested ``config.json`` to our keyword arguments.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn as nn

from .layers import full_precision

__all__ = ["HighResNet", "ResidualBlock", "Encoder", "Decoder", "median_reference", "check_alphas", "ViewsModel",
           "map_reference_config", "kwargs_from_reference"]

REF_VIEWS = 9  # the authors' anchor is the median of the first 9 frames (their inputs: clearest first)


def median_reference(lrs: torch.Tensor, views: int = REF_VIEWS) -> torch.Tensor:
    """``lrs (B,L,H,W) -> (B,1,H,W)``: pixel-wise median of the first ``views`` frames.

    ``torch.median`` (the lower of the two middle values for an even count), as the authors use;
    padded frames among the first ``views`` take part (the authors pad with zero frames).
    """
    return lrs[:, :views].median(dim=1, keepdim=True).values


def check_alphas(lrs: torch.Tensor, alphas: torch.Tensor | None, model: str) -> torch.Tensor:
    """``alphas (B,L)`` of ``lrs (B,L,h,w)`` in ``lrs``' dtype; None means every view is real (all ones).

    Raises:
        ValueError: ``alphas`` is not ``(B,L)``.
    """
    b, t = lrs.shape[:2]
    if alphas is None:
        return lrs.new_ones(b, t)
    if alphas.shape != (b, t):
        raise ValueError(f"{model}: alphas must be (B,L) = {(b, t)}, got {tuple(alphas.shape)}")
    return alphas.to(lrs.dtype)


class ViewsModel(nn.Module):
    """The common interface of the three networks that take views and their padding flags
    (HighRes-net, MISR-GRU, TR-MISR): ``forward(lrs, alphas)`` as their authors call it."""

    has_uncertainty = False

    def super_resolve(self, lr: torch.Tensor, lr_mask: torch.Tensor | None = None,
                      alphas: torch.Tensor | None = None) -> dict:
        """``lr (B,L,h,w)`` in [0,1] (clearest first, padding last), ``alphas (B,L)`` 1 = real view,
        0 = padding (None: all real) -> ``{"sr": (B,1,3h,3w)}``, the raw network output in [0,1] units
        (scoring clips it, or applies the authors' output step: ``ModelSpec.postprocess``). The
        quality maps are not read: none of the three feeds them to its network."""
        return {"sr": self(lr, alphas)}


class ResidualBlock(nn.Module):
    """``x + PReLU(conv(PReLU(conv(x))))`` with 'same' padding; ``(N,C,H,W) -> (N,C,H,W)``."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.block = nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=pad), nn.PReLU(),
                                   nn.Conv2d(channels, channels, kernel_size, padding=pad), nn.PReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """conv + PReLU, ``n_resblocks`` residual blocks, conv; ``(N,c_in,H,W) -> (N,c,H,W)``."""

    def __init__(self, in_channels: int, channels: int, n_resblocks: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.init_layer = nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size, padding=pad), nn.PReLU())
        self.res_layers = nn.Sequential(*[ResidualBlock(channels, kernel_size) for _ in range(n_resblocks)])
        # a one-element Sequential: the authors' key is ``final.0.weight``
        self.final = nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.res_layers(self.init_layer(x)))


class Decoder(nn.Module):
    """Transposed convolution (kernel = stride = ``scale``) + PReLU, then a 'same' convolution to one
    channel; ``(N,c,h,w) -> (N,1,scale*h,scale*w)``, no output activation."""

    def __init__(self, channels: int, deconv_channels: int, scale: int, final_kernel_size: int):
        super().__init__()
        # kernel == stride: each LR pixel paints its own scale x scale block, so the output is exactly scale*h
        self.deconv = nn.Sequential(nn.ConvTranspose2d(channels, deconv_channels, scale, stride=scale), nn.PReLU())
        self.final = nn.Conv2d(deconv_channels, 1, final_kernel_size, padding=final_kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return full_precision(self.final, self.deconv(x))  # the SR in float32 under autocast


class RecursiveFusion(nn.Module):
    """The authors' ``RecuversiveNet`` (sic): pairwise fusion by one shared residual block + conv.

    ``forward(x (B,L,C,H,W), alphas (B,L)) -> (B,C,H,W)``.
    """

    def __init__(self, channels: int, kernel_size: int, alpha_residual: bool):
        super().__init__()
        self.alpha_residual = alpha_residual
        self.fuse = nn.Sequential(ResidualBlock(2 * channels, kernel_size),
                                  nn.Conv2d(2 * channels, channels, kernel_size, padding=kernel_size // 2),
                                  nn.PReLU())

    def forward(self, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        b, _, c, h, w = x.shape
        while x.shape[1] > 1:
            half = x.shape[1] // 2
            # frame i meets frame 2*half-1-i; with an odd count the last frame is dropped, as the authors do
            alice = x[:, :half]
            bob = x[:, half:2 * half].flip(1)
            fused = self.fuse(torch.cat([alice, bob], 2).flatten(0, 1)).view(b, half, c, h, w)
            if self.alpha_residual:
                # a padded partner (alpha 0) leaves the first frame as it was: padding never enters
                alpha_bob = alphas[:, half:2 * half].flip(1)
                x = alice + alpha_bob[:, :, None, None, None] * fused
                alphas = alphas[:, :half]
            else:
                x = fused
        return x[:, 0]


class HighResNet(ViewsModel):
    """HighRes-net.

    Args (the authors' ``config.json`` keys in brackets; defaults are their published configuration):
        n_feats (encoder.channel_size = recursive.in_channels = deconv.in_channels): feature channels.
        n_resblocks (encoder.num_layers): residual blocks in the encoder.
        kernel_size (encoder.kernel_size): encoder convolutions.
        fuse_kernel_size (recursive.kernel_size): fusion convolutions.
        alpha_residual (recursive.alpha_residual): skip the fusion of a pair whose second frame is padding.
        deconv_channels (deconv.out_channels = final.in_channels): channels after the transposed convolution.
        scale (deconv.stride = deconv.kernel_size): upscaling factor.
        final_kernel_size (final.kernel_size): the last convolution.
    ``recursive.num_layers`` has no effect in the authors' code (one fusion block, applied recursively).

    ``forward(lrs (B,L,h,w) in [0,1] (uint16/65535), alphas (B,L) in {0,1}, 1 = real frame, None = all)
    -> (B,1,scale*h,scale*w)``, SR in [0,1] units, not clamped (the authors clip to [0,1] to score).
    Frames are expected clearest first with padding last (the anchor is the median of the first 9);
    any ``L >= 1``; with an odd frame count at a fusion step the last frame is left out.
    """

    registry_name = "highresnet"

    def __init__(self, n_feats: int = 64, n_resblocks: int = 2, kernel_size: int = 3, fuse_kernel_size: int = 3,
                 alpha_residual: bool = True, deconv_channels: int = 64, scale: int = 3, final_kernel_size: int = 1):
        super().__init__()
        self.encode = Encoder(2, n_feats, n_resblocks, kernel_size)  # input: frame and anchor
        self.fuse = RecursiveFusion(n_feats, fuse_kernel_size, alpha_residual)
        self.decode = Decoder(n_feats, deconv_channels, scale, final_kernel_size)

    def forward(self, lrs: torch.Tensor, alphas: torch.Tensor | None = None) -> torch.Tensor:
        b, t, h, w = lrs.shape
        alphas = check_alphas(lrs, alphas, "HighResNet")
        ref = median_reference(lrs).expand(b, t, h, w)
        x = self.encode(torch.stack([lrs, ref], 2).flatten(0, 1))  # (B*L, C, h, w)
        x = self.fuse(x.unflatten(0, (b, t)), alphas.to(x.dtype))
        return self.decode(x)


# --- the authors' nested config.json -> our keyword arguments -------------------------------------------------------

def _flatten(config: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def map_reference_config(cls: type[nn.Module], config: dict, names: dict[str, str],
                         tied: dict[str, Callable[[dict], object] | None]) -> dict:
    """Map an authors' nested config to ``cls``'s keyword arguments.

    Args:
        cls: the model class (its signature gives the defaults of keys the config leaves out).
        config: the ``network`` section of the authors' ``config.json``.
        names: dotted config key -> our keyword argument.
        tied: dotted config keys that follow from the others: key -> a function of the resolved
            keyword arguments giving the only value the model supports, or None for a key the
            authors' code ignores.

    Returns:
        the keyword arguments (only those the config sets). Unknown keys raise ``KeyError`` and
        values the model cannot honour raise ``ValueError``, each naming the key.
    """
    flat = _flatten(config)
    unknown = sorted(set(flat) - set(names) - set(tied))
    if unknown:
        raise KeyError(f"{cls.__name__}: unknown reference config key(s) {', '.join(unknown)}; "
                       f"valid: {', '.join(sorted(set(names) | set(tied)))}")
    kwargs = {names[k]: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items() if k in names}
    defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
                if p.default is not inspect.Parameter.empty}
    resolved = {**defaults, **kwargs}
    for key, rule in tied.items():
        if key in flat and rule is not None and flat[key] != rule(resolved):
            raise ValueError(f"{cls.__name__}: reference config {key}={flat[key]!r} is not supported "
                             f"(it must be {rule(resolved)!r} given the other keys)")
    return kwargs


HIGHRESNET_NAMES = {
    "encoder.channel_size": "n_feats", "encoder.num_layers": "n_resblocks", "encoder.kernel_size": "kernel_size",
    "recursive.kernel_size": "fuse_kernel_size", "recursive.alpha_residual": "alpha_residual",
    "decoder.deconv.out_channels": "deconv_channels", "decoder.deconv.stride": "scale",
    "decoder.final.kernel_size": "final_kernel_size",
}
HIGHRESNET_TIED = {
    "encoder.in_channels": lambda k: 2,  # frame + anchor, always
    "recursive.in_channels": lambda k: k["n_feats"],
    "recursive.num_layers": None,  # read but never used by the authors
    "decoder.deconv.in_channels": lambda k: k["n_feats"],
    "decoder.deconv.kernel_size": lambda k: k["scale"],  # otherwise the output is not scale*h
    "decoder.final.in_channels": lambda k: k["deconv_channels"],
    "decoder.final.out_channels": lambda k: 1,
}


def kwargs_from_reference(config: dict) -> dict:
    """The authors' nested ``network`` config (``encoder``, ``recursive``, ``decoder``) -> :class:`HighResNet`
    keyword arguments; unknown keys are a ``KeyError`` naming them."""
    return map_reference_config(HighResNet, config, HIGHRESNET_NAMES, HIGHRESNET_TIED)


def authors_network(checkout: str) -> nn.Module:
    """The authors' own HighRes-net (``src/DeepNetworks/HRNet.py``) at their ``config/config.json``,
    from a local checkout of ServiceNow/HighRes-net, behind ``forward(lr)`` (every view real); for
    benchmarks against their code. Their code is executed: use a checkout you trust. Never shipped here."""
    from .authors import views_network
    return views_network(checkout, "src/DeepNetworks/HRNet.py", "HRNet", "config/config.json",
                         "highresnet_authors")
