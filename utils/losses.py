"""Training losses: the cPSNR losses start from :func:`utils.metrics.registered_stats`, the core of
cPSNR; the registered L1 losses search the same 49 offsets pixel by pixel.

All take the model output of the common interface (``sr (B,1,H,W)`` in [0,1], ``log_scale`` for
PIUnet) and the batch's ``hr (B,1,H,W)`` in [0,1] and ``hr_mask (B,1,H,W)`` in {0,1}. Samples
whose mask has no clear pixel in any window carry no information and are left out of the mean;
a batch with none of them gives a zero loss that still depends on the graph (so backward works).

- ``cpsnr``: the QA-Net authors' loss, minus the brightness-corrected cPSNR (dB) of the whole
  patch over its clear pixels, without the shift search. ``cpsnr_shift``: the same with the
  49-offset search of the official metric (the SR patch is cropped by 3 pixels).
- ``l1_reg``: PIUnet's registered L1, the minimum over the 49 offsets of the brightness-corrected
  mean absolute error over the clear pixels. ``l1_reg_std``: the same in the authors' standardised
  units (x 65535 / 2353.0723 = 27.85): the loss PIUnet's authors train their first epoch with. Adam
  is nearly invariant to the scale, but gradient clipping (15) acts 27.85x sooner on it.
- ``l1u_reg``: PIUnet's registered L1-uncertainty loss, the minimum over the offsets of the mean
  of ``s + |y - mu - b| exp(-s)`` over the clear pixels, ``s`` the predicted Laplace log-scale.
  In [0,1] units it differs from the authors' standardised-unit loss by a constant only.
- ``l1_reg_scale``: ``l1_reg`` for the SR plus ``l1u_reg`` of the scale on the *detached* SR: the
  scale learns the error of the SR (a Laplace fit) without pulling the SR towards pixels it finds
  easy, which the joint loss does; with a model whose scale head reads detached features
  (PIUnet's ``scale_detached``) only ``l1_reg`` reaches the SR (bit for bit without gradient clipping).

The authors' released training code computes two of these differently from what the papers
describe; each is available as an option, so a reproduction can follow either:

- ``cpsnr_original``: QA-Net's released ``get_loss`` exactly as it computes on ``(B,1,H,W)``
  tensors. Its sums over dims (1,2) run over the channel and the rows, so it takes one brightness
  bias per image *column* (over the clear pixels of that column, count + 1, bias detached), and
  ``bias.view(-1,1,1)`` broadcasts all ``B*W`` column biases of the batch against every sample:
  the squared error is summed over a ``(B, B*W, H, W)`` tensor, per column, and the per-column
  PSNRs (columns with a clear pixel) are averaged. Computed here in closed form, without that tensor.
- ``l1u_reg_original``: PIUnet's released uncertainty loss, which adds the brightness bias to the
  log-scale as well as to the mean: ``s' = s + b * 65535 / 2353.0723`` (the bias in the authors'
  standardised units), loss ``s' + |y - mu - b| exp(-s')``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .metrics import as_bhw, check_metric_inputs, registered_stats, shifted_windows
from .units import FULL_SCALE, RAW_STD

__all__ = ["LOSSES", "LossSpec", "cpsnr_loss", "qanet_released_loss", "registered_l1", "registered_l1_uncertainty",
           "compute_loss"]

_CMSE_FLOOR = 1e-12  # 120 dB: keeps log10 finite for a perfect patch


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values (B,)`` where ``valid``; 0 (attached to the graph) when none is."""
    if bool(valid.any()):
        return values[valid].mean()
    return values.nan_to_num(0.0, posinf=0.0, neginf=0.0).sum() * 0.0


def cpsnr_loss(sr: torch.Tensor, hr: torch.Tensor, hr_mask: torch.Tensor, shift: bool = False,
               border: int = 3) -> torch.Tensor:
    """``-mean_b cPSNR_b`` in dB (lower is better); no shift search unless ``shift``."""
    stats = registered_stats(sr, hr, hr_mask, border if shift else 0)
    valid_offsets = stats.n > 0
    best = torch.where(valid_offsets, stats.cmse, torch.full_like(stats.cmse, float("inf"))).flatten(1).amin(1)
    valid = torch.isfinite(best)
    psnr = -10.0 * torch.log10(best.clamp_min(_CMSE_FLOOR))
    return -_masked_mean(psnr, valid).to(sr.dtype)


def qanet_released_loss(sr: torch.Tensor, hr: torch.Tensor, hr_mask: torch.Tensor) -> torch.Tensor:
    """Minus QA-Net's released ``get_loss(sr, hr, hr_mask)`` on ``(B,1,H,W)`` tensors (lower is better).

    With ``d = sr - hr``, ``m`` the mask and ``c_j`` (``j < B*W``) the detached column biases of the
    whole batch, the released code sums ``m (d + c_j)^2`` over ``j`` and the rows; that is
    ``N*S2 + 2*C1*S1 + C2*S0`` with ``S_k = sum_rows m d^k``, ``C1 = sum_j c_j``,
    ``C2 = sum_j c_j^2``, ``N = B*W``, summed here in float64 instead of over a ``(B,B*W,H,W)`` tensor.
    """
    if sr.dim() != 4 or sr.shape[1] != 1:
        raise ValueError(f"cpsnr_original: expected (B,1,H,W) tensors, got {tuple(sr.shape)}")
    f64 = torch.float64
    d, m = (sr - hr).to(f64), hr_mask.to(f64)
    s0, s1, s2 = m.sum((1, 2)), (m * d).sum((1, 2)), (m * d * d).sum((1, 2))
    nclear = s0 + 1  # (B, W): the +1 of the released code
    bias = (-s1 / nclear).detach().reshape(-1)  # (B*W,): mean of hr - sr over each column's clear pixels
    cmse = (bias.numel() * s2 + 2 * bias.sum() * s1 + (bias * bias).sum() * s0) / nclear  # (B, W)
    used = nclear > 1  # columns with a clear pixel; the others count as cMSE 1 (0 dB) in the sum
    psnr = -10.0 * torch.log10(torch.where(used, cmse, torch.ones_like(cmse)))
    # a sample without any clear pixel would divide by zero (NaN) in the released code: left out here
    return -_masked_mean(psnr.sum(1) / used.sum(1).clamp_min(1), used.any(1)).to(sr.dtype)


def _registered(sr: torch.Tensor, hr: torch.Tensor, hr_mask: torch.Tensor, border: int,
                per_pixel) -> torch.Tensor:
    """Min over offsets of the clear-pixel mean of ``per_pixel(residual, crop, bias)``, mean over the
    batch.

    ``residual = HR window - SR crop - bias`` of an offset, ``bias`` ``(B, K, 1, 1)`` the brightness
    bias (mean of HR - SR over the clear pixels) of each of its ``K`` offsets, ``crop`` the index of
    the SR crop in a full-size ``(B,1,H,W)`` tensor.

    The minimum's gradient reaches only the offset that attains it, so each sample's offset is
    chosen first without autograd (every offset's value, with the biases of
    :func:`utils.metrics.registered_stats`), and only that offset is evaluated again with autograd
    (its bias summed directly): the value and gradient of differentiating the minimum over all
    offsets, without a backward pass through 49 windows and the FFTs of the biases.
    """
    sr3, hr3, m3 = check_metric_inputs(sr, hr, hr_mask, border)
    B, H, W = sr3.shape
    crop = (slice(None), slice(None), slice(border, H - border), slice(border, W - border))
    y_all = shifted_windows(hr3.to(sr.dtype), border)  # (B, S*S, h, w) views, no copies
    m_all = shifted_windows(m3.to(sr.dtype), border)
    x = sr3[:, None, border:H - border, border:W - border]  # (B, 1, h, w)

    def clear_mean(per_pixel_values, m, n):  # (B, K, h, w) -> (B, K); inf where no pixel is clear
        per = (per_pixel_values * m).flatten(2).sum(-1) / n.clamp_min(1)
        return torch.where(n > 0, per, torch.full_like(per, float("inf")))

    with torch.no_grad():  # every offset's value; the biases from cPSNR's core, in float64
        stats = registered_stats(sr3.detach(), hr3, m3, border)
        n_all = stats.n.reshape(B, -1).to(sr.dtype)
        bias_all = stats.bias.reshape(B, -1, 1, 1).to(sr.dtype)
        best = clear_mean(per_pixel(y_all - x - bias_all, crop, bias_all), m_all, n_all).min(1)
    rows = torch.arange(B, device=sr3.device)
    y, m = y_all[rows, best.indices][:, None], m_all[rows, best.indices][:, None]  # (B, 1, h, w)
    n = m.flatten(1).sum(-1, keepdim=True)  # (B, 1)
    bias = ((y - x) * m).flatten(2).sum(-1) / n.clamp_min(1)  # differentiable, as in the direct loop
    picked = clear_mean(per_pixel(y - x - bias[..., None, None], crop, bias[..., None, None]), m, n)[:, 0]
    return _masked_mean(picked, torch.isfinite(best.values))


def registered_l1(sr: torch.Tensor, hr: torch.Tensor, hr_mask: torch.Tensor, border: int = 3) -> torch.Tensor:
    """PIUnet's registered L1 (see the module docstring); a scalar in [0,1] units."""
    return _registered(sr, hr, hr_mask, border, lambda r, crop, b: r.abs())


def registered_l1_uncertainty(sr: torch.Tensor, log_scale: torch.Tensor, hr: torch.Tensor,
                              hr_mask: torch.Tensor, border: int = 3) -> torch.Tensor:
    """PIUnet's registered Laplace loss ``s + |y - mu - b| exp(-s)``; ``log_scale (B,1,H,W)``."""
    s = as_bhw(log_scale, "log_scale")[:, None]
    return _registered(sr, hr, hr_mask, border, lambda r, crop, b: s[crop] + r.abs() * torch.exp(-s[crop]))


def registered_l1_and_scale(sr: torch.Tensor, log_scale: torch.Tensor, hr: torch.Tensor,
                            hr_mask: torch.Tensor, border: int = 3) -> torch.Tensor:
    """``registered_l1(sr) + registered_l1_uncertainty(sr detached, log_scale)``: the SR's loss and the
    scale's Laplace loss on the SR's error, the scale's gradient kept away from the SR."""
    return (registered_l1(sr, hr, hr_mask, border)
            + registered_l1_uncertainty(sr.detach(), log_scale, hr, hr_mask, border))


def registered_l1_uncertainty_released(sr: torch.Tensor, log_scale: torch.Tensor, hr: torch.Tensor,
                                       hr_mask: torch.Tensor, border: int = 3) -> torch.Tensor:
    """PIUnet's released uncertainty loss: the brightness bias ``b`` of each offset (in [0,1] units)
    is also added to the log-scale, in the authors' standardised units: ``s' = s + b*65535/2353.0723``,
    loss ``s' + |y - mu - b| exp(-s')``."""
    s = as_bhw(log_scale, "log_scale")[:, None]
    k = FULL_SCALE / RAW_STD

    def per_pixel(r, crop, b):
        s_b = s[crop] + b * k
        return s_b + r.abs() * torch.exp(-s_b)

    return _registered(sr, hr, hr_mask, border, per_pixel)


@dataclass(frozen=True)
class LossSpec:
    """A training loss: ``fn(out, hr, hr_mask) -> scalar`` (lower is better), with ``out`` the model's
    output dict, and whether it reads the uncertainty output (``out["log_scale"]``)."""

    fn: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor]
    uses_uncertainty: bool = False


def _sr(out: dict) -> torch.Tensor:
    return out["sr"].float()


def _log_scale(out: dict) -> torch.Tensor:
    return out["log_scale"].float()


# The one table of losses: config's choices and the trainer's DDP setting come from it.
LOSSES: dict[str, LossSpec] = {
    "cpsnr": LossSpec(lambda out, hr, m: cpsnr_loss(_sr(out), hr, m)),
    "cpsnr_shift": LossSpec(lambda out, hr, m: cpsnr_loss(_sr(out), hr, m, shift=True)),
    "cpsnr_original": LossSpec(lambda out, hr, m: qanet_released_loss(_sr(out), hr, m)),
    "l1_reg": LossSpec(lambda out, hr, m: registered_l1(_sr(out), hr, m)),
    # PIUnet's first epoch as its authors compute it: the registered L1 in their standardised units
    "l1_reg_std": LossSpec(lambda out, hr, m: registered_l1(_sr(out), hr, m) * (FULL_SCALE / RAW_STD)),
    "l1u_reg": LossSpec(lambda out, hr, m: registered_l1_uncertainty(_sr(out), _log_scale(out), hr, m),
                        uses_uncertainty=True),
    "l1_reg_scale": LossSpec(lambda out, hr, m: registered_l1_and_scale(_sr(out), _log_scale(out), hr, m),
                             uses_uncertainty=True),
    "l1u_reg_original": LossSpec(
        lambda out, hr, m: registered_l1_uncertainty_released(_sr(out), _log_scale(out), hr, m), uses_uncertainty=True),
}


def run_losses(loss: str, warmup_loss: str = "", warmup_epochs: int = 0) -> tuple[str, ...]:
    """The losses a run trains with: ``loss``, and ``warmup_loss`` when it has warm-up epochs."""
    return (loss,) + ((warmup_loss,) if warmup_loss and warmup_epochs > 0 else ())


def compute_loss(name: str, out: dict, hr: torch.Tensor, hr_mask: torch.Tensor) -> torch.Tensor:
    """The loss ``name`` (a key of :data:`LOSSES`) of a model output dict against the batch."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    spec = LOSSES[name]
    if spec.uses_uncertainty and "log_scale" not in out:
        raise ValueError(f"loss {name!r} needs a model with an uncertainty output (log_scale)")
    return spec.fn(out, hr, hr_mask)
