"""PIUnet: permutation-invariant, uncertainty-aware MISR (Valsesia & Magli, IEEE TGRS 2021).

Frames are encoded by shared convolutions and self-attention across the frame axis (TEFA blocks:
temporally-equivariant feature attention, with squeeze-and-excitation), registered by TERN (one
predicted 5x5 filter per frame, applied to all of that frame's channels), averaged over frames
(hence invariant to their order and to their number), and upscaled: the mean is the pixel-shuffled
residual plus the mean of the bilinearly upscaled input frames; a second head predicts the
log-scale ``s`` of a Laplace likelihood (the uncertainty).

The core ``forward`` keeps the authors' numerics: frames standardised with :data:`utils.units.RAW_MEAN` and
:data:`utils.units.RAW_STD` (raw uint16 units) in, ``(mu, s)`` in those standardised units out.
:meth:`PIUnet.super_resolve` is the one place that maps frames in [0,1] to SR in [0,1] and the
log-scale to [0,1] units, so training, validation and prediction never see the standardisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.units import STD_UNIT, destandardize, standardize

from .baseline import ESABaseline
from .layers import FrameAttention, FrameConv, full_precision, is_channels_last


def _frame_mean(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``(B*T, C, H, W) -> (B, C, H, W)``: mean over the frames."""
    return x.unflatten(0, (x.shape[0] // frames, frames)).mean(1)


class TEFA(nn.Module):
    """Two conv + frame-attention stages, channel squeeze-and-excitation, residual.
    ``forward(h (B*T,C,H,W), frames) -> (B*T,C,H,W)``."""

    def __init__(self, c: int, r_bneck: int, heads: int):
        super().__init__()
        self.conv0, self.norm00, self.tran0, self.norm0 = (FrameConv(c, c), nn.BatchNorm2d(c),
                                                           FrameAttention(c, heads), nn.BatchNorm2d(c))
        self.conv1, self.norm11, self.tran1, self.norm1 = (FrameConv(c, c), nn.BatchNorm2d(c),
                                                           FrameAttention(c, heads), nn.BatchNorm2d(c))
        self.lin0 = nn.Linear(c, c // r_bneck)
        self.lin1 = nn.Linear(c // r_bneck, c)

    def forward(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        h0 = h
        h = F.leaky_relu(self.norm00(self.conv0(h)))
        h = F.leaky_relu(self.norm0(h + self.tran0(h, None, frames)))
        h = F.leaky_relu(self.norm11(self.conv1(h)))
        h = self.norm1(h + self.tran1(h, None, frames))
        bt, c = h.shape[:2]
        if is_channels_last(h):  # (B, C): mean over frames and pixels
            z = h.permute(0, 2, 3, 1).reshape(bt // frames, -1, c).mean(1)
        else:
            z = h.view(bt // frames, frames, c, -1).mean((1, 3))
        z = torch.sigmoid(self.lin1(F.leaky_relu(self.lin0(z))))
        return h * z.repeat_interleave(frames, 0)[:, :, None, None] + h0


class TERN(nn.Module):
    """Registration: predicts a 5x5 filter per frame and applies it to every channel of that frame.
    ``forward(h (B*T,C,H,W), frames) -> (B*T,C,H,W)``."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.conv0, self.norm00, self.tran0, self.norm0 = (FrameConv(c, c), nn.BatchNorm2d(c),
                                                           FrameAttention(c, heads), nn.BatchNorm2d(c))
        self.conv1 = nn.Conv1d(c, 25, 1)

    def forward(self, h_in: torch.Tensor, frames: int) -> torch.Tensor:
        bt, c, hh, ww = h_in.shape
        h = F.leaky_relu(self.norm00(self.conv0(h_in)))
        h = F.leaky_relu(self.norm0(h + self.tran0(h, None, frames)))
        w = F.linear(h.mean((2, 3)), self.conv1.weight[:, :, 0], self.conv1.bias)  # (B*T, 25)
        # one filter per frame, shared by its channels: a depthwise convolution over B*T*C maps
        kernel = w.view(bt, 1, 5, 5).expand(bt, c, 5, 5).reshape(bt * c, 1, 5, 5)
        out = F.conv2d(h_in.reshape(1, bt * c, hh, ww), kernel, padding=2, groups=bt * c)
        return out.view(bt, c, hh, ww)


# widths (HR pixels) of the windows over which error_cues averages the SR's local contrast
CUE_WIDTHS = (3, 9, 19)


def _upscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bilinear upscaling by ``scale`` (half-pixel centres), the one PIUnet uses for frames, features
    and cues alike."""
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def _box_mean(x: torch.Tensor, width: int) -> torch.Tensor:
    """Mean of ``x (B,1,H,W)`` over a ``width`` x ``width`` window (the part inside the image at the
    borders), as two 1-D passes: O(width) per pixel, not O(width**2)."""
    x = F.avg_pool2d(x, (width, 1), 1, (width // 2, 0), count_include_pad=False)
    return F.avg_pool2d(x, (1, width), 1, (0, width // 2), count_include_pad=False)


def frame_disagreement(mu: torch.Tensor, lrs: torch.Tensor, scale: int) -> torch.Tensor:
    """How far the frames are from the SR they were made into: ``(B,1,H,W)``, the mean over frames of
    ``|frame - box_mean(SR)|`` at each LR pixel, each frame's mean difference removed first (frames of
    a scene differ in overall brightness), bilinearly upscaled. Large where a frame saw something the
    SR does not show: a change on the ground, a cloud the masks missed, a misregistered edge.
    ``mu (B,1,H,W)`` and ``lrs (B,T,h,w)`` in the same (standardised) units, ``H = scale*h``."""
    diff = lrs - F.avg_pool2d(mu, scale)
    diff = diff - diff.mean((2, 3), keepdim=True)
    return _upscale(diff.abs().mean(1, keepdim=True), scale)


def error_cues(mu: torch.Tensor, lrs: torch.Tensor, scale: int) -> torch.Tensor:
    """Where an SR is likely wrong, from the SR and the frames alone: ``(B, len(CUE_WIDTHS)+1, H, W)``,
    the log of the SR's gradient magnitude averaged over each width of :data:`CUE_WIDTHS`, and the
    log of :func:`frame_disagreement`. ``mu (B,1,H,W)`` and ``lrs (B,T,h,w)`` standardised,
    ``H = scale*h``; the logs are floored at 1e-3 standardised units."""
    dy = F.pad(mu[..., 1:, :] - mu[..., :-1, :], (0, 0, 0, 1))
    dx = F.pad(mu[..., :, 1:] - mu[..., :, :-1], (0, 1, 0, 0))
    grad = (dy.square() + dx.square()).sqrt()
    cues = [_box_mean(grad, w) for w in CUE_WIDTHS] + [frame_disagreement(mu, lrs, scale)]
    return torch.cat(cues, 1).clamp_min(1e-3).log()


class PIUnet(nn.Module):
    """PIUnet.

    Args (the authors' names in brackets; defaults are their published configuration):
        n_feats (N_feat): feature channels. r_bneck (R_bneck): squeeze-and-excitation reduction.
        n_tefa (N_tefa): TEFA blocks. n_heads (N_heads): attention heads. scale: upscaling (3).
        skip: what the predicted residual is added to. ``"bilinear"`` (the authors): the mean of
            the bilinearly upscaled frames. ``"baseline"`` (ours): the ESA baseline of the input
            frames (:class:`models.baseline.ESABaseline`, which reads the masks), with the last
            layer of the residual zero-initialised, so training starts from the baseline and
            only learns what improves on it. Same parameters and state-dict keys either way.
        scale_detached: ``False`` (the authors): the uncertainty head reads the features the SR is
            made of, and its loss trains them too. ``True`` (ours): it reads them detached, so a
            loss on the scale (``l1_reg_scale``) trains the head alone. Same parameters and
            outputs either way.
        scale_cues: ``False`` (the authors). ``True`` (ours): the log-scale also reads, through a
            learned 1x1 convolution (zero at the start), cues at the SR's resolution that the
            features upscaled from the frames carry poorly (:func:`error_cues`: the SR's local
            contrast at three widths, how far the frames are from the SR). Measured on held-out
            scenes, a scale fitted on them ranks the error at Spearman +0.35, the head alone at
            +0.11 to +0.15. Adds 5 parameters (``sigma_cues``).

    ``forward(lrs (B,T,h,w) standardised) -> (mu, s)``, each ``(B,1,3h,3w)``: ``mu`` in standardised
    units, ``s`` the log-scale of the Laplace likelihood in those units. Any ``T >= 1``; the output
    does not depend on the order of the frames.
    """

    has_uncertainty = True

    def __init__(self, n_feats: int = 42, r_bneck: int = 8, n_tefa: int = 16, n_heads: int = 1, scale: int = 3,
                 skip: str = "bilinear", scale_detached: bool = False, scale_cues: bool = False):
        super().__init__()
        if skip not in ("bilinear", "baseline"):
            raise ValueError(f"piunet: skip must be 'bilinear' or 'baseline', got {skip!r}")
        c, self.scale, self.skip, self.scale_detached = n_feats, scale, skip, scale_detached
        self.scale_cues = scale_cues
        # what a checkpoint trained without the cues may leave at its initialisation (zero: no effect)
        self.neutral_keys = ("sigma_cues.weight", "sigma_cues.bias") if scale_cues else ()
        # what a final fit of the scale on full scenes adjusts (engine.scale_fit): its last layers
        self.scale_fit_layers = ("conv_out_sigma", "sigma_cues") if scale_cues else ("conv_out_sigma",)
        self.conv_in = FrameConv(1, c)
        self.tran_in = FrameAttention(c, n_heads)
        self.norm00 = nn.BatchNorm2d(c)
        self.norm0 = nn.BatchNorm2d(c)
        self.res = nn.ModuleList([TEFA(c, r_bneck, n_heads) for _ in range(n_tefa)])
        self.conv_mid = FrameConv(c, c)
        self.tran_mid = FrameAttention(c, n_heads)
        self.norm11 = nn.BatchNorm2d(c)
        self.norm1 = nn.BatchNorm2d(c)
        self.regnet = TERN(c, n_heads)
        self.conv_d2s_mu = nn.Conv2d(c, scale * scale, 3, padding=1)
        self.conv_d2s_sigma = nn.Conv2d(c, c, 3, padding=1)
        self.conv_out_sigma = nn.Conv2d(c, 1, 1)
        self.norm_sigma = nn.BatchNorm2d(c)
        if scale_cues:
            self.sigma_cues = nn.Conv2d(len(CUE_WIDTHS) + 1, 1, 1)
            nn.init.zeros_(self.sigma_cues.weight)
            nn.init.zeros_(self.sigma_cues.bias)
        if skip == "baseline":
            self.baseline = ESABaseline(scale)
            nn.init.zeros_(self.conv_d2s_mu.weight)
            nn.init.zeros_(self.conv_d2s_mu.bias)

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        return _upscale(x, self.scale)

    def forward(self, lrs: torch.Tensor, base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``lrs (B,T,h,w)`` standardised -> ``(mu, s)``; ``base (B,1,3h,3w)`` standardised is the
        image the residual is added to (default: the mean of the bilinearly upscaled frames)."""
        b, t, h, w = lrs.shape
        x = self.conv_in(lrs.reshape(b * t, 1, h, w))
        x = F.leaky_relu(self.norm00(x.contiguous(memory_format=getattr(self, "memory_format",
                                                                         torch.contiguous_format))))
        x = self.norm0(x + self.tran_in(x, None, t))
        x_res = x
        for block in self.res:
            x = block(x, t)
        x = F.leaky_relu(self.norm11(self.conv_mid(x)))
        x = F.leaky_relu(self.norm1(x + self.tran_mid(x, None, t)))
        x = self.regnet(x + x_res, t)
        x = _frame_mean(x, t)  # (B, C, h, w): invariant to the frame order
        # bilinear upscaling is linear: the mean of the upscaled frames is the upscaled mean
        if base is None:
            base = self._up(lrs.mean(1, keepdim=True))
        # the last layers in float32 under autocast: bf16 would quantise the SR and its scale
        mu = F.pixel_shuffle(full_precision(self.conv_d2s_mu, x), self.scale) + base
        # scale_detached: the scale's loss reaches its own head only, never the features the SR is made of
        xs = x.detach() if self.scale_detached else x
        s = full_precision(self.conv_out_sigma, F.leaky_relu(self.norm_sigma(self.conv_d2s_sigma(self._up(xs)))))
        if self.scale_cues:  # read from the detached SR: no gradient reaches the SR from here
            s = s + full_precision(self.sigma_cues, error_cues(mu.detach(), lrs, self.scale))
        return mu, s

    def super_resolve(self, lr: torch.Tensor, lr_mask: torch.Tensor | None = None,
                      alphas: torch.Tensor | None = None) -> dict:
        """The common interface: ``lr (B,T,h,w)`` in [0,1] (the masks are read only with
        ``skip="baseline"``, by the ESA baseline the residual is added to; ``alphas`` not at all) ->
        ``{"sr": (B,1,3h,3w) in [0,1] units, "log_scale": (B,1,3h,3w)}``, the Laplace log-scale in
        [0,1] units: ``s + log(RAW_STD / 65535)``."""
        base = None
        if self.skip == "baseline":
            if lr_mask is None:
                raise ValueError("piunet with skip='baseline' needs the quality maps (lr_mask)")
            base = standardize(self.baseline(lr, lr_mask))
        mu, s = self(standardize(lr), base)
        return {"sr": destandardize(mu), "log_scale": s + math.log(STD_UNIT)}


def authors_network(checkout: str) -> nn.Module:
    """The authors' own PIUnet class at their default configuration, from a local checkout of their
    repository (``Code/piunet/model.py``); for benchmarks against their code. Their code is
    executed: use a checkout you trust. Never shipped here."""
    import types
    from pathlib import Path

    from .authors import exec_source
    mod = exec_source(Path(checkout) / "Code" / "piunet" / "model.py", "piunet_ref")
    return mod.PIUNET(types.SimpleNamespace(N_feat=42, R_bneck=8, N_tefa=16, N_heads=1))
