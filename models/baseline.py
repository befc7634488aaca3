"""The ESA competition baseline: bicubic x3 upscaling of the clearest frames, averaged.

The bicubic kernel is Keys' cubic convolution with a = -0.5 sampled as PIL's ``BICUBIC`` resize
does (pixel centres aligned, the kernel window clipped at the image edge and renormalised). With
this kernel the baseline reproduces the competition's ``norm.csv`` to about 0.002 dB; scikit-image's
order-3 spline (0.02-0.24 dB off) and torch's bicubic with a = -0.75 (about 0.1 dB off) do not.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["keys_cubic", "bicubic_matrix", "bicubic_weights", "bicubic_upscale", "esa_baseline", "ESABaseline"]


def keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel, support [-2, 2]."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@lru_cache(maxsize=16)
def bicubic_matrix(n_in: int, scale: int = 3) -> np.ndarray:
    """``(n_in*scale, n_in)`` float64 matrix M with ``M @ signal`` the 1-D bicubic upscaling."""
    n_out = n_in * scale
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        center = (o + 0.5) / scale
        lo = max(int(center - 2 + 0.5), 0)  # PIL's window: taps whose centres lie within 2 px
        hi = min(int(center + 2 + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = keys_cubic(taps + 0.5 - center)
        m[o, lo:hi] = w / w.sum()  # renormalised where the window is clipped at an edge
    m.setflags(write=False)
    return m


def bicubic_weights(n_in: int, scale: int = 3, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`bicubic_matrix` built on ``device`` from torch's factory functions: ``(n_in*scale, n_in)``
    float64.

    Why not copy the NumPy matrix in: a forward pass that copies host data to the GPU cannot be
    captured as a CUDA graph (and breaks ``torch.compile``'s graph). Keys' kernel is zero outside
    [-2, 2], so PIL's tap window is the kernel's support clipped to the image; rows are renormalised
    where it is clipped, as in :func:`bicubic_matrix` (equal to it to float64 rounding)."""
    centers = (torch.arange(n_in * scale, dtype=torch.float64, device=device) + 0.5) / scale
    taps = torch.arange(n_in, dtype=torch.float64, device=device) + 0.5
    x = (taps[None, :] - centers[:, None]).abs()  # distance of each tap to each output centre
    a = -0.5
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    w = torch.where(x < 1, inner, outer * (x < 2))
    return w / w.sum(1, keepdim=True)


def bicubic_upscale(img: np.ndarray | torch.Tensor, scale: int = 3) -> np.ndarray | torch.Tensor:
    """Upscale ``(..., h, w)`` by ``scale`` with the PIL-style Keys kernel (separable, float64).

    Accepts numpy arrays or torch tensors (any device); returns the same kind, float64. For tensors
    the kernel is built on the tensor's device (:func:`bicubic_weights`): no host data is copied in.
    """
    h, w = img.shape[-2:]
    if isinstance(img, torch.Tensor):
        mh, mw = bicubic_weights(h, scale, img.device), bicubic_weights(w, scale, img.device)
        return mh @ img.to(torch.float64) @ mw.T
    mh, mw = bicubic_matrix(h, scale), bicubic_matrix(w, scale)
    return mh @ np.asarray(img, dtype=np.float64) @ mw.T


def esa_baseline(lr: np.ndarray, qm: np.ndarray) -> np.ndarray:
    """The competition baseline SR image.

    Args:
        lr: ``(T,h,w)`` frames, ``np.uint16`` raw values or floats in [0, 1].
        qm: ``(T,h,w)`` bool, True = clear.

    Returns:
        ``np.float64 (3h, 3w)`` in [0, 1]: the mean of the bicubic x3 upscalings of every frame
        whose clear-pixel count equals the maximum.
    """
    lr = np.asarray(lr)
    qm = np.asarray(qm, dtype=bool)
    if lr.ndim != 3 or lr.shape != qm.shape:
        raise ValueError(f"esa_baseline: lr and qm must be (T,h,w) of one shape, got {lr.shape} and {qm.shape}")
    x = lr / 65535.0 if lr.dtype == np.uint16 else lr.astype(np.float64)
    clear = qm.sum((1, 2))
    best = x[clear == clear.max()]
    return np.clip(bicubic_upscale(best).mean(0), 0.0, 1.0)


class ESABaseline(torch.nn.Module):
    """The baseline as a parameter-free model with the common interface of :mod:`models`.

    ``forward(lr (B,T,h,w) in [0,1], lr_mask (B,T,h,w) {0,1}) -> (B,1,3h,3w)`` in [0,1]. Padded
    (repeated) frames do not change the result: a repeat of a clearest frame keeps the mean.
    """

    has_uncertainty = False

    def __init__(self, scale: int = 3):
        super().__init__()
        self.scale = scale

    def forward(self, lr: torch.Tensor, lr_mask: torch.Tensor) -> torch.Tensor:
        clear = lr_mask.flatten(2).sum(-1)  # (B,T)
        pick = (clear == clear.amax(1, keepdim=True)).to(torch.float64)
        up = bicubic_upscale(lr, self.scale)  # (B,T,3h,3w) float64
        sr = (up * pick[..., None, None]).sum(1) / pick.sum(1)[:, None, None]
        return sr.clamp(0, 1).unsqueeze(1).to(lr.dtype)

    def super_resolve(self, lr: torch.Tensor, lr_mask: torch.Tensor, alphas: torch.Tensor | None = None) -> dict:
        """The common interface: ``{"sr": (B,1,3h,3w)}`` in [0,1] (``alphas`` not read)."""
        return {"sr": self(lr, lr_mask)}
