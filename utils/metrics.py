"""The Kelvin competition metrics: cPSNR, cSSIM and the normalised score, batched in pure torch.

Definitions (ESA Kelvin PROBA-V challenge). Images are in [0, 1] (uint16 / 65535). The SR image is
cropped by ``border`` pixels on each side; for each of the ``(2*border+1)**2`` offsets ``(u, v)``
the HR image and its status map are cropped at ``(u, v)`` to the same size. Over the clear pixels
of that crop, the brightness bias ``b = mean(HR - SR)`` is removed and
``cMSE = mean((HR - SR - b)**2)``; ``cPSNR = -10 log10(cMSE)``. The score of a scene is the
maximum cPSNR over the offsets.

One core, :func:`registered_stats`, computes the clear-pixel count, the bias and the cMSE for all
offsets at once. It never loops over offsets or images: the masked sums over every shifted window
are cross-correlations, computed with real FFTs (for the terms that involve SR) and integral
images (for the terms that involve only HR and its mask). Everything runs in float64 internally,
whatever the input dtype, because cMSE is a small difference of large sums (a float32 core loses
about 0.01 dB). The cPSNR, the cSSIM, and every registered loss in :mod:`utils.losses` start from
this core, so evaluation and training see the same definition.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["RegisteredStats", "registered_stats", "cpsnr", "cssim", "kelvin_score", "has_clear", "shifted_windows",
           "as_bhw", "check_metric_inputs"]


class RegisteredStats(NamedTuple):
    """Per-offset statistics; every tensor is float64 ``(B, S, S)`` with ``S = 2*border + 1``.

    ``n``: clear pixels in the HR window at offset (u, v). ``bias``: mean(HR - SR) over them
    (0 where ``n == 0``). ``cmse``: the bias-corrected clear MSE (``inf`` where ``n == 0``).
    """

    n: torch.Tensor
    bias: torch.Tensor
    cmse: torch.Tensor


def as_bhw(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` as ``(B,H,W)``, from ``(B,1,H,W)`` or ``(B,H,W)``; a ValueError naming ``name`` otherwise."""
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{name}: expected (B,1,H,W) or (B,H,W), got {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{name}: expected (B,1,H,W) or (B,H,W), got {tuple(x.shape)}")
    return x


def check_metric_inputs(sr, hr, hr_mask, border):
    """``(sr, hr, hr_mask)`` as ``(B,H,W)`` after checking they share a shape that ``border`` leaves
    something of; a ValueError saying what is wrong otherwise."""
    sr, hr, hr_mask = as_bhw(sr, "sr"), as_bhw(hr, "hr"), as_bhw(hr_mask, "hr_mask")
    if not (sr.shape == hr.shape == hr_mask.shape):
        raise ValueError(f"sr, hr and hr_mask must share a shape, got {tuple(sr.shape)}, "
                         f"{tuple(hr.shape)}, {tuple(hr_mask.shape)}")
    if border < 0 or 2 * border >= min(sr.shape[-2:]):
        raise ValueError(f"border={border} leaves nothing of a {tuple(sr.shape[-2:])} image")
    return sr, hr, hr_mask


def _window_sums(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sums of ``x (B,H,W)`` over every ``h x w`` window -> ``(B, H-h+1, W-w+1)``.

    Meant for few offsets (windows nearly as large as the image): a window's sum is the row sums
    minus the thin strips outside it, so the cost is one pass over ``x`` plus the strips.
    """
    def along_last(a: torch.Tensor, n: int) -> torch.Tensor:
        # window sums along the last axis: (..., L) -> (..., L - n + 1)
        k = a.shape[-1] - n
        total = a.sum(-1, keepdim=True)
        if k == 0:
            return total
        left = F.pad(a[..., :k].cumsum(-1), (1, 0))  # sums of a[..., :v]
        right = F.pad(a[..., n:].flip(-1).cumsum(-1).flip(-1), (0, 1))  # sums of a[..., v+n:]
        return total - left - right

    return along_last(along_last(x, w).transpose(-1, -2), h).transpose(-1, -2)


def _dft_rows_cols(H: int, W: int, rows: range, cols: range, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices evaluating a real 2-D inverse DFT (of a half spectrum) at ``rows x cols`` only."""
    r = torch.arange(H, device=device, dtype=dtype)
    k = torch.arange(W // 2 + 1, device=device, dtype=dtype)
    u = torch.tensor(list(rows), device=device, dtype=dtype)
    v = torch.tensor(list(cols), device=device, dtype=dtype)
    e_rows = torch.polar(torch.ones(len(u), H, dtype=dtype, device=device), 2 * torch.pi * u[:, None] * r / H)
    # the half spectrum stands for its conjugate twin: weight 2 except the DC and Nyquist columns
    weight = torch.full_like(k, 2.0)
    weight[0] = 1.0
    if W % 2 == 0:
        weight[-1] = 1.0
    e_cols = torch.polar((weight / (H * W))[:, None].expand(-1, len(v)), 2 * torch.pi * k[:, None] * v / W)
    return e_rows, e_cols


def registered_stats(sr: torch.Tensor, hr: torch.Tensor, hr_mask: torch.Tensor,
                     border: int = 3) -> RegisteredStats:
    """Clear count, brightness bias and cMSE of ``sr`` against ``hr`` at every offset.

    Args:
        sr: ``(B,H,W)`` or ``(B,1,H,W)`` float in [0, 1], the super-resolved image (full size;
            it is cropped by ``border`` here).
        hr: same shape, the target in [0, 1].
        hr_mask: same shape, bool or {0,1}: True where the HR pixel is clear.
        border: crop of SR on each side; offsets run over ``0..2*border`` in both axes.

    Returns:
        :class:`RegisteredStats` of float64 ``(B, 2*border+1, 2*border+1)`` tensors; differentiable
        with respect to ``sr`` (and ``hr``).
    """
    sr, hr, hr_mask = check_metric_inputs(sr, hr, hr_mask, border)
    B, H, W = sr.shape
    s = 2 * border + 1
    h, w = H - 2 * border, W - 2 * border
    f64 = torch.float64
    m = hr_mask.to(f64)
    hr = hr.to(f64)
    sr = sr[:, border:H - border, border:W - border].to(f64)
    # Centring HR and SR (by their clear / global means) changes no bias-corrected error but keeps
    # the sums small, so their final difference keeps its digits. HR is centred after the fact
    # (the sums are linear in it); SR while it is padded, a copy the FFT needs anyway.
    mh = m * hr
    mhh = mh * hr
    n = _window_sums(m, h, w)
    c_hr = mh.sum((-2, -1), keepdim=True) / m.sum((-2, -1), keepdim=True).clamp_min(1)
    c_sr = sr.mean((-2, -1), keepdim=True)
    raw_h = _window_sums(mh, h, w)
    sum_h = raw_h - c_hr * n
    sum_hh = _window_sums(mhh, h, w) - 2 * c_hr * raw_h + c_hr * c_hr * n

    # The SR terms are cross-correlations with the HR side, by FFT: spectra of m and m*hr, and of
    # the centred SR crop and its square, both zero-padded to (H, W) in one (B,2,H,W) buffer.
    # The inverse transform is evaluated only at the 49 offsets.
    sr_side = sr.new_zeros(B, 2, H, W)
    sr_c = sr - c_sr
    sr_side[:, 0, :h, :w] = sr_c
    sr_side[:, 1, :h, :w] = sr_c * sr_c
    f_sr = torch.fft.rfft2(sr_side).conj().resolve_conj()
    f_m, f_mh = torch.fft.rfft2(m), torch.fft.rfft2(mh)
    e_rows, e_cols = _dft_rows_cols(H, W, range(s), range(s), sr.device, f64)
    sum_s, sum_ss = (e_rows @ (f_m[:, None] * f_sr) @ e_cols).real.unbind(1)
    sum_hs = (e_rows @ (f_mh * f_sr[:, 0]) @ e_cols).real - c_hr * sum_s

    clear = n > 0
    n_safe = n.clamp_min(1)
    sum_d = sum_h - sum_s
    sq = (sum_hh - 2 * sum_hs + sum_ss - sum_d * sum_d / n_safe).clamp_min(0)
    bias = torch.where(clear, sum_d / n_safe + (c_hr - c_sr), torch.zeros_like(n))
    cmse = torch.where(clear, sq / n_safe, torch.full_like(n, float("inf")))
    return RegisteredStats(n=n, bias=bias, cmse=cmse)


def has_clear(hr_mask: torch.Tensor, border: int = 3) -> torch.Tensor:
    """``(B,)`` bool: whether any offset window of the status map holds a clear pixel.

    A scene without one has no defined cPSNR; evaluation reports and skips it.
    """
    m = as_bhw(hr_mask, "hr_mask").to(torch.float64)
    H, W = m.shape[-2:]
    return _window_sums(m, H - 2 * border, W - 2 * border).flatten(1).amax(1) > 0


def cpsnr(sr: torch.Tensor, hr: torch.Tensor, hr_mask: torch.Tensor, border: int = 3) -> torch.Tensor:
    """Official Kelvin cPSNR in dB, one value per image.

    Args:
        sr, hr: ``(B,H,W)`` or ``(B,1,H,W)`` float in [0, 1] (any H, W > 2*border, any device).
        hr_mask: same shape, bool or {0,1}, True = clear.
        border: SR crop; 3 for the competition (49 offsets).

    Returns:
        ``(B,)`` tensor in the dtype of ``sr`` (float64 core). NaN for an image whose status map
        has no clear pixel in any window (check with :func:`has_clear`); differentiable.
    """
    stats = registered_stats(sr, hr, hr_mask, border)
    best = stats.cmse.flatten(1).amin(1)
    out = -10.0 * torch.log10(best)
    out = torch.where(torch.isinf(best), torch.full_like(out, float("nan")), out)
    return out.to(sr.dtype if sr.is_floating_point() else torch.float64)


def shifted_windows(x: torch.Tensor, border: int = 3) -> torch.Tensor:
    """All offset crops of ``x (B,H,W)`` as a view ``(B, S*S, H-2b, W-2b)``, offsets row-major.

    ``out[:, u*S + v] == x[:, u:u+H-2b, v:v+W-2b]``. Used where a loss or metric is not a sum of
    products (L1, SSIM) and must see the pixels of every offset.
    """
    x = as_bhw(x, "x")
    H, W = x.shape[-2:]
    s = 2 * border + 1
    v = x.unfold(1, H - 2 * border, 1).unfold(2, W - 2 * border, 1)  # (B, S, S, h, w)
    return v.reshape(x.shape[0], s * s, H - 2 * border, W - 2 * border)


def _box_mean(x: torch.Tensor, win: int) -> torch.Tensor:
    """Means of ``x (..., h, w)`` over every ``win x win`` window (valid region) by running sums:
    a few operations per pixel, whatever the window (an 11x11 pooling costs 121)."""
    c = F.pad(x.cumsum(-1), (1, 0))
    x = c[..., win:] - c[..., :-win]
    c = F.pad(x.cumsum(-2), (0, 0, 1, 0))
    return (c[..., win:, :] - c[..., :-win, :]) / (win * win)


def _ssim_map_mean(x: torch.Tensor, y: torch.Tensor, win: int, data_range: float) -> torch.Tensor:
    """Mean SSIM over the valid region of ``x, y (N,h,w)``, as skimage's default (uniform window,
    sample covariance, K1=0.01, K2=0.03) -> ``(N,)``."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    np_ = win * win
    cov_norm = np_ / (np_ - 1)
    mu_x, mu_y, xx, yy, xy = (_box_mean(t, win) for t in (x, y, x * x, y * y, x * y))
    vx = cov_norm * (xx - mu_x * mu_x)
    vy = cov_norm * (yy - mu_y * mu_y)
    vxy = cov_norm * (xy - mu_x * mu_y)
    s = ((2 * mu_x * mu_y + c1) * (2 * vxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def cssim(sr: torch.Tensor, hr: torch.Tensor, hr_mask: torch.Tensor, border: int = 3,
          win_size: int = 11, data_range: float = 1.0) -> torch.Tensor:
    """Shift-aware, brightness-corrected SSIM as the QA-Net authors report it.

    For each offset (u, v): the HR crop and SR crop are both multiplied by the clear mask, the SR
    crop is shifted by that offset's bias (from :func:`registered_stats`), and SSIM is computed
    with skimage's defaults (11x11 uniform window). The score is the maximum over offsets.

    Args: as :func:`cpsnr`; ``data_range`` is the dynamic range of [0, 1] images.

    The SSIM maps are computed in float64 for float64 input and in float32 otherwise: on the
    fixture scenes float32 agrees with float64 to 1e-7 and is 4x faster on CPU.

    Returns:
        ``(B,)`` in the dtype of ``sr``; NaN where the status map has no clear pixel.
    """
    stats = registered_stats(sr, hr, hr_mask, border)
    sr, hr, hr_mask = check_metric_inputs(sr, hr, hr_mask, border)
    H, W = sr.shape[-2:]
    s2 = (2 * border + 1) ** 2
    dt = torch.float64 if sr.dtype == torch.float64 else torch.float32
    out = []
    for i in range(sr.shape[0]):  # one scene at a time bounds memory at 49 crops
        m = shifted_windows(hr_mask[i:i + 1].to(dt), border)[0]
        y = shifted_windows(hr[i:i + 1].to(dt), border)[0] * m
        x = sr[i, border:H - border, border:W - border].to(torch.float64)
        x = ((x + stats.bias[i].reshape(s2, 1, 1)).to(dt)) * m
        val = _ssim_map_mean(x, y, win_size, data_range)
        val = torch.where(stats.n[i].reshape(s2) > 0, val, torch.full_like(val, -float("inf")))
        best = val.amax()
        out.append(torch.where(torch.isinf(best), torch.full_like(best, float("nan")), best))
    return torch.stack(out).to(sr.dtype if sr.is_floating_point() else torch.float64)


def kelvin_score(cpsnr_db: torch.Tensor, norm_db: torch.Tensor) -> torch.Tensor:
    """Kelvin score ``mean(norm / cPSNR)`` over the scenes that have a cPSNR (lower is better;
    the ESA baseline scores 1.0). Scenes with NaN cPSNR (no clear pixel) or NaN norm are left out.

    Args: ``cpsnr_db (N,)`` and ``norm_db (N,)`` (the norm.csv baselines), in dB.
    """
    keep = ~torch.isnan(cpsnr_db)
    if not bool(keep.any()):
        raise ValueError("kelvin_score: no scene has a cPSNR (every status map is empty)")
    keep &= ~torch.isnan(norm_db)  # a scene norm.csv lacks has no score (NaN when none has one)
    return (norm_db[keep] / cpsnr_db[keep]).mean()
