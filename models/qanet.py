"""QA-Net: quality-map-associated attention network (Kim et al., arXiv 2202.13124).

Features of the LR frames and of their quality maps (QMs) go through ``n_modules`` pairs of blocks:
a LEM (low-resolution encoding module: a residual group of channel-attention blocks, self-attention
across the frames, then attention across the frames whose queries come from the QM features) and a
QEM (quality encoding module: two convolutions and a sigmoid, giving per-frame, per-pixel weights).
The frames are fused by the QM-weighted mean and upscaled by a convolution and pixel shuffle.

Checkpoint-compatible with the authors' implementation (parameter names, shapes and numerics);
works on non-square inputs. The number of frames is fixed at construction (``n_frames``), because
the temporal BatchNorms hold one statistic per frame index.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.units import STD_UNIT
from utils.units import destandardize as _destandardize
from utils.units import standardize as _standardize

from .baseline import ESABaseline
from .layers import FrameAttention, FrameConv, frame_norm, full_precision


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation per frame: ``x (N,C,H,W) -> x * sigmoid(MLP(mean_HW x))``."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(x.mean((2, 3), keepdim=True))


class RCAB(nn.Module):
    """Residual channel-attention block: ``x + CA(conv(leaky(conv(x))))`` (BatchNorms optional)."""

    def __init__(self, channels: int, reduction: int, bn: bool):
        super().__init__()
        layers: list[nn.Module] = [FrameConv(channels, channels)]
        if bn:
            layers.append(nn.BatchNorm2d(channels))
        layers += [nn.LeakyReLU(), FrameConv(channels, channels)]
        if bn:
            layers.append(nn.BatchNorm2d(channels))
        self.body = nn.Sequential(*layers)
        self.ca = ChannelAttention(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ca(self.body(x))


class ResidualGroup(nn.Module):
    def __init__(self, channels: int, reduction: int, blocks: int, bn: bool):
        super().__init__()
        self.body = nn.Sequential(*[RCAB(channels, reduction, bn) for _ in range(blocks)],
                                  FrameConv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class LEM(nn.Module):
    """``forward(x, q (B*T,C,H,W)) -> (B*T,C,H,W)``."""

    def __init__(self, channels: int, reduction: int, blocks: int, heads: int, frames: int, bn: bool):
        super().__init__()
        self.frames = frames
        self.mha1 = FrameAttention(channels, heads)
        self.tnorm1 = nn.BatchNorm2d(frames)  # per frame index: see frame_norm
        self.mha2 = FrameAttention(channels, heads)
        self.tnorm2 = nn.BatchNorm2d(frames)
        self.rg1 = ResidualGroup(channels, reduction, blocks, bn)
        self.cnorm1 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        t = self.frames
        x = self.cnorm1(x + self.rg1(x))  # the authors add the group's output to its input again
        x = frame_norm(self.tnorm1, x + self.mha1(x, None, t))
        # queries from the quality features, keys and values from the frame features
        return frame_norm(self.tnorm2, x + self.mha2(q, x, t))


class QEM(nn.Module):
    """``forward(q (B*T,C,H,W)) -> sigmoid(BN(q + conv2(conv1(q))))``, in (0, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = FrameConv(channels, channels)
        self.conv2 = FrameConv(channels, channels)
        self.cnorm = nn.BatchNorm2d(channels)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.cnorm(q + self.conv2(self.conv1(q))))


class QANet(nn.Module):
    """QA-Net.

    Args (the authors' names in brackets; defaults are their published configuration):
        n_modules (N_modules): LEM/QEM pairs. n_resblocks (N_resblocks): RCABs per LEM.
        n_feats (N_feats): feature channels. reduction: channel-attention reduction.
        n_heads (N_heads): attention heads. scale: upscaling factor.
        n_frames (N_lrs): frames per scene (fixed). rcab_bn: BatchNorm inside the RCABs.
        skip: what the network's output is added to. ``"none"`` (the authors): nothing, the
            pixel-shuffled output of ``last`` is the SR image. ``"baseline"`` (ours): the ESA
            baseline of the input frames and their quality maps
            (:class:`models.baseline.ESABaseline`: the mean of the bicubic upscalings of the
            clearest frames), with ``last`` zero-initialised, so training starts exactly at the
            baseline and learns a residual on it. Same parameters and state-dict keys either way;
            the authors' configurations keep exactly their keyword arguments.
        standardize: ``False`` (the authors): frames enter in [0,1] units (raw/65535) and the
            output is in those units. ``True`` (ours): frames enter standardised with the
            dataset's raw mean and standard deviation (:data:`utils.units.RAW_MEAN`,
            :data:`utils.units.RAW_STD`, as PIUnet's authors do) and the output is in those
            units, mapped back to [0,1] units before the baseline is added. Why: in [0,1] units
            the frames' standard deviation is 0.036 and the target differs from the ESA baseline
            by about 0.005, while an Adam step of the last layer (about ``lr`` per weight) can
            move the output by twice that; standardised, the same step is 28x finer
            (65535 / RAW_STD), as in PIUnet. Same parameters either way.

    ``forward(lrs (B,T,h,w) in [0,1], qms (B,T,h,w) in {0,1}) -> (B,1,scale*h,scale*w)``, SR in
    [0,1] units (not clamped).
    """

    has_uncertainty = False

    def __init__(self, n_modules: int = 12, n_resblocks: int = 8, n_feats: int = 36, reduction: int = 16,
                 n_heads: int = 1, scale: int = 3, n_frames: int = 9, rcab_bn: bool = False, skip: str = "none",
                 standardize: bool = False):
        super().__init__()
        if skip not in ("none", "baseline"):
            raise ValueError(f"qanet: skip must be 'none' or 'baseline', got {skip!r}")
        self.frames, self.scale, self.skip, self.standardize = n_frames, scale, skip, standardize
        self.init = FrameConv(1, n_feats)
        self.lems = nn.Sequential(*[LEM(n_feats, reduction, n_resblocks, n_heads, n_frames, rcab_bn)
                                    for _ in range(n_modules)])
        self.qems = nn.Sequential(*[QEM(n_feats) for _ in range(n_modules)])
        self.last = nn.Conv2d(n_feats, scale * scale, 3, padding=1)
        if skip == "baseline":
            self.baseline = ESABaseline(scale)  # no parameters or buffers: the state dict is unchanged
            nn.init.zeros_(self.last.weight)
            nn.init.zeros_(self.last.bias)

    def forward(self, lrs: torch.Tensor, qms: torch.Tensor) -> torch.Tensor:
        b, t, h, w = lrs.shape
        if t != self.frames:
            raise ValueError(f"QANet was built for n_frames={self.frames}, got {t} frames")
        if qms.shape != lrs.shape:
            raise ValueError(f"QANet: lrs {tuple(lrs.shape)} and qms {tuple(qms.shape)} differ in shape")
        frames = _standardize(lrs) if self.standardize else lrs
        # one shared first convolution for frames and quality maps
        x, q = self.init(torch.cat([frames, qms.to(lrs.dtype)]).reshape(2 * b * t, 1, h, w)).chunk(2)
        fmt = getattr(self, "memory_format", torch.contiguous_format)
        x, q = x.contiguous(memory_format=fmt), q.contiguous(memory_format=fmt)
        x0 = x
        for lem, qem in zip(self.lems, self.qems, strict=True):
            x = lem(x, q)
            q = qem(q)
        x = (x + x0).unflatten(0, (b, t))
        q = q.unflatten(0, (b, t))
        fused = (x * q).sum(1) / q.sum(1)  # QM-weighted mean over frames; q > 0 (a sigmoid)
        sr = F.pixel_shuffle(full_precision(self.last, fused), self.scale)  # float32 under autocast
        if self.skip == "baseline":  # a residual: from standardised units it needs only their scale
            return (sr * STD_UNIT if self.standardize else sr) + self.baseline(lrs, qms)
        return _destandardize(sr) if self.standardize else sr

    def super_resolve(self, lr: torch.Tensor, lr_mask: torch.Tensor, alphas: torch.Tensor | None = None) -> dict:
        """The common interface: ``lr (B,T,h,w)`` in [0,1], ``lr_mask`` {0,1} -> ``{"sr": (B,1,3h,3w)}``.
        ``alphas`` (padding flags) are not read: QA-Net's frames are never padded with empty views."""
        return {"sr": self(lr, lr_mask)}


def authors_network(checkout: str) -> nn.Module:
    """The authors' own QA-Net class at their default configuration, from a local checkout of their
    repository (``net/qanet.py`` with ``utils/resize.py``); for benchmarks against their code. Their
    code is executed: use a checkout you trust. Never shipped here."""
    import importlib.util
    import re
    import sys
    import types
    from pathlib import Path
    root = Path(checkout)
    resize = importlib.util.spec_from_file_location("resize", root / "utils" / "resize.py")
    mod_r = importlib.util.module_from_spec(resize)
    sys.modules["resize"] = mod_r  # torch.compile looks the helpers' module up by name
    resize.loader.exec_module(mod_r)
    # the resize helpers are put in the namespace below, whichever way the file imports them
    src = re.sub(r"^from (utils\.)?resize import \*", "", (root / "net" / "qanet.py").read_text(), flags=re.M)
    ns: dict = dict(vars(mod_r))
    exec(compile(src, str(root / "net" / "qanet.py"), "exec"), ns)
    cfg = dict(N_modules=12, N_resblocks=8, N_feats=36, reduction=16, N_heads=1, scale=3, N_lrs=9, rcab_bn=False)
    return ns["QANet"](types.SimpleNamespace(**cfg))
