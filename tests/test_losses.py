"""The losses against direct, loop-over-offsets computations: values and gradients."""
from __future__ import annotations

import pytest
import torch

from utils.losses import (
    compute_loss,
    cpsnr_loss,
    qanet_released_loss,
    registered_l1,
    registered_l1_uncertainty,
    registered_l1_uncertainty_released,
)


def _case(seed=0, b=3, size=20, clear=0.7):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 1, size, size, generator=g, dtype=torch.float64) * 0.3 + 0.1
    sr = (hr + 0.02 * torch.randn(b, 1, size, size, generator=g, dtype=torch.float64) + 0.01).requires_grad_()
    mask = (torch.rand(b, 1, size, size, generator=g) < clear).double()
    s = (0.1 * torch.randn(b, 1, size, size, generator=g, dtype=torch.float64) - 4).requires_grad_()
    return sr, hr, mask, s


def _direct(sr, hr, mask, border, per_pixel, reduce_min=True):
    """Per sample: min (or, for cPSNR, max) over offsets of a clear-pixel mean; then batch mean."""
    H, W = sr.shape[-2:]
    h, w = H - 2 * border, W - 2 * border
    out = []
    for i in range(sr.shape[0]):
        vals = []
        x = sr[i, 0, border:border + h, border:border + w]
        for u in range(2 * border + 1):
            for v in range(2 * border + 1):
                y, m = hr[i, 0, u:u + h, v:v + w], mask[i, 0, u:u + h, v:v + w]
                n = m.sum()
                b = ((y - x) * m).sum() / n
                vals.append(per_pixel(y - x - b, i, border) * m)
                vals[-1] = vals[-1].sum() / n
        vals = torch.stack(vals)
        out.append(vals.min() if reduce_min else vals.max())
    return torch.stack(out).mean()


def _check(loss_fn, direct_fn, inputs):
    got = loss_fn()
    grads = torch.autograd.grad(got, inputs)
    want = direct_fn()
    grads_want = torch.autograd.grad(want, inputs)
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    for a, b in zip(grads, grads_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


def test_registered_l1_matches_direct_loop():
    sr, hr, mask, _ = _case(0)
    _check(lambda: registered_l1(sr, hr, mask),
           lambda: _direct(sr, hr, mask, 3, lambda r, i, b: r.abs()), [sr])


def test_registered_l1_uncertainty_matches_direct_loop():
    sr, hr, mask, s = _case(1)
    H = sr.shape[-1]

    def per_pixel(r, i, b):
        si = s[i, 0, b:H - b, b:H - b]
        return si + r.abs() * torch.exp(-si)

    _check(lambda: registered_l1_uncertainty(sr, s, hr, mask), lambda: _direct(sr, hr, mask, 3, per_pixel), [sr, s])


def test_cpsnr_loss_matches_direct_with_and_without_shift():
    sr, hr, mask, _ = _case(2)

    def direct(border):
        # minus the mean over samples of -10 log10(min over offsets of cMSE)
        psnr = [-10 * torch.log10(_direct(sr[i:i + 1], hr[i:i + 1], mask[i:i + 1], border, lambda r, j, b: r * r))
                for i in range(sr.shape[0])]
        return -torch.stack(psnr).mean()

    _check(lambda: cpsnr_loss(sr, hr, mask), lambda: direct(0), [sr])
    _check(lambda: cpsnr_loss(sr, hr, mask, shift=True), lambda: direct(3), [sr])


def test_losses_skip_samples_without_clear_pixels_and_stay_differentiable():
    sr, hr, mask, s = _case(3)
    mask[1] = 0.0
    for name in ("cpsnr", "cpsnr_shift", "cpsnr_original", "l1_reg", "l1u_reg", "l1u_reg_original"):
        out = {"sr": sr, "log_scale": s}
        full = compute_loss(name, out, hr, mask)
        kept = compute_loss(name, {"sr": sr[[0, 2]], "log_scale": s[[0, 2]]}, hr[[0, 2]], mask[[0, 2]])
        assert torch.isfinite(full)
        if name != "cpsnr_original":  # whose column biases reach across the batch by design
            assert full.item() == pytest.approx(kept.item(), rel=1e-6)
    none = compute_loss("l1_reg", {"sr": sr}, hr, torch.zeros_like(mask))
    assert none.item() == 0.0
    none.backward()  # a batch with no clear pixel still backpropagates (zeros)
    assert torch.all(sr.grad == 0)


def test_compute_loss_errors():
    sr, hr, mask, _ = _case(4)
    with pytest.raises(ValueError, match="uncertainty"):
        compute_loss("l1u_reg", {"sr": sr}, hr, mask)
    with pytest.raises(ValueError, match="choose from"):
        compute_loss("mse", {"sr": sr}, hr, mask)


def _qanet_released_direct(sr, hr, mask):
    """QA-Net's released get_loss written out from its description: on (B,1,H,W), one detached
    brightness bias per sample and column (clear count + 1), every one of the B*W biases applied to
    every sample (the (B, B*W, H, W) broadcast), a cPSNR per column, averaged over the columns with a
    clear pixel and over the batch; the loss is minus that."""
    B, _, H, W = sr.shape
    nclear = mask[:, 0].sum(1) + 1  # (B, W): clear pixels per column, + 1
    bias = (mask[:, 0] * (hr[:, 0] - sr[:, 0])).sum(1).detach() / nclear  # (B, W)
    corrected = sr + bias.reshape(1, B * W, 1, 1)  # (B, B*W, H, W)
    cmse = (mask * (corrected - hr) ** 2).sum((1, 2)) / nclear  # (B, W)
    cmse = torch.where(nclear > 1, cmse, torch.ones_like(cmse))
    psnr = -10 * torch.log10(cmse)
    return -(psnr.sum(1) / (nclear > 1).sum(1)).mean()


def test_cpsnr_original_matches_the_released_formula():
    sr, hr, mask, _ = _case(5, b=3, size=12, clear=0.6)
    mask[1, 0, :, 4] = 0.0  # a column with no clear pixel
    _check(lambda: qanet_released_loss(sr, hr, mask), lambda: _qanet_released_direct(sr, hr, mask), [sr])
    # it is not the intended whole-patch cPSNR: the gradients differ
    g_orig = torch.autograd.grad(qanet_released_loss(sr, hr, mask), sr)[0]
    g_int = torch.autograd.grad(cpsnr_loss(sr, hr, mask), sr)[0]
    assert (g_orig - g_int).norm() / g_int.norm() > 0.05


def test_cpsnr_original_is_float32_accurate_and_needs_4d():
    sr, hr, mask, _ = _case(6, b=4, size=16)
    got = compute_loss("cpsnr_original", {"sr": sr.detach().float()}, hr.float(), mask.float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_qanet_released_direct(sr.detach(), hr, mask).item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"\(B,1,H,W\)"):
        compute_loss("cpsnr_original", {"sr": sr[:, 0]}, hr[:, 0], mask[:, 0])


def test_l1u_reg_original_adds_the_bias_to_the_log_scale():
    sr, hr, mask, s = _case(7)
    H = sr.shape[-1]
    k = 65535.0 / 2353.0723  # [0,1] units -> the authors' standardised units

    def direct():
        # _direct passes the residual r = y - x - b; recover b per offset from the same loop
        out = []
        for i in range(sr.shape[0]):
            x = sr[i, 0, 3:H - 3, 3:H - 3]
            si = s[i, 0, 3:H - 3, 3:H - 3]
            vals = []
            for u in range(7):
                for v in range(7):
                    y, m = hr[i, 0, u:u + H - 6, v:v + H - 6], mask[i, 0, u:u + H - 6, v:v + H - 6]
                    b = ((y - x) * m).sum() / m.sum()
                    sb = si + b * k
                    vals.append(((sb + (y - x - b).abs() * torch.exp(-sb)) * m).sum() / m.sum())
            out.append(torch.stack(vals).min())
        return torch.stack(out).mean()

    _check(lambda: registered_l1_uncertainty_released(sr, s, hr, mask), direct, [sr, s])
    intended = registered_l1_uncertainty(sr, s, hr, mask)
    assert intended.item() != pytest.approx(direct().item(), rel=1e-3)


def test_registered_l1_in_float32_agrees_with_float64_on_a_training_patch():
    # the offsets are compared and the chosen offset's bias is summed in the input's dtype: float32
    # training patches (8 x 96x96, realistic brightness) must give the float64 value and gradient
    g = torch.Generator().manual_seed(5)
    hr = torch.rand(8, 1, 96, 96, generator=g, dtype=torch.float64) * 0.2 + 0.2
    sr64 = (hr.roll(1, -1) + 0.01 * torch.randn(8, 1, 96, 96, generator=g, dtype=torch.float64)).requires_grad_()
    mask = (torch.rand(8, 1, 96, 96, generator=g) < 0.9).double()
    sr32 = sr64.detach().float().requires_grad_()
    want = registered_l1(sr64, hr, mask)
    got = registered_l1(sr32, hr.float(), mask.float())
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    want.backward()
    got.backward()
    torch.testing.assert_close(sr32.grad.double(), sr64.grad, rtol=1e-4, atol=1e-9)
