
import pytest
import torch

from bench import cpsnr_loop
from conftest import shared_path
from utils.metrics import cpsnr, cssim, has_clear, kelvin_score, registered_stats, shifted_windows


@pytest.fixture(scope="module")
def cases():
    return torch.load(shared_path("fixtures", "metric_cases.pt"))


def _tensors(c, dtype):
    return c["sr"][None].to(dtype), (c["hr"].double() / 65535.0)[None].to(dtype), c["sm"][None]


def test_cpsnr_matches_official_values_float64(cases):
    for c in cases:
        sr, hr, sm = _tensors(c, torch.float64)
        assert abs(cpsnr(sr, hr, sm).item() - c["cpsnr"]) < 1e-6


def test_cpsnr_matches_official_values_float32_batched(cases):
    for size in (384, 96):
        group = [c for c in cases if c["sr"].shape[-1] == size]
        sr = torch.stack([c["sr"] for c in group]).float()
        hr = torch.stack([c["hr"] for c in group]).float() / 65535.0
        sm = torch.stack([c["sm"] for c in group]).unsqueeze(1)  # (B,1,H,W) with a (B,H,W) sr
        got = cpsnr(sr.unsqueeze(1), hr.unsqueeze(1), sm)
        assert got.dtype == torch.float32 and got.shape == (len(group),)
        want = torch.tensor([c["cpsnr"] for c in group], dtype=torch.float64)
        assert (got.double() - want).abs().max().item() < 1e-3


@pytest.mark.parametrize("shape,border", [((3, 40, 52), 3), ((2, 30, 30), 1), ((1, 17, 23), 0)])
def test_cpsnr_equals_loop_on_any_shape(shape, border):
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(shape, generator=g, dtype=torch.float64) * 0.3 + 0.1
    sr = (hr + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.02).clamp(0, 1)
    mask = torch.rand(shape, generator=g) > 0.3
    want = torch.tensor([cpsnr_loop(sr[i].numpy(), hr[i].numpy(), mask[i].numpy(), border) for i in range(shape[0])],
                        dtype=torch.float64)
    assert torch.allclose(cpsnr(sr, hr, mask, border), want, atol=1e-8, rtol=0)


def test_bias_and_shift_invariance():
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(2, 48, 48, generator=g, dtype=torch.float64) * 0.5
    mask = torch.ones_like(hr, dtype=torch.bool)
    sr = hr.clone()
    sr[:, 3:-3, 3:-3] = hr[:, 1:-5, 5:-1] + 0.05  # shifted by (-2, +2) and brighter
    # perfect after bias removal at the right offset: cMSE 0, cPSNR +inf
    stats = registered_stats(sr, hr, mask)
    assert stats.cmse[:, 1, 5].max().item() < 1e-12
    assert torch.allclose(stats.bias[:, 1, 5], torch.full((2,), -0.05, dtype=torch.float64))


def test_cpsnr_is_differentiable():
    g = torch.Generator().manual_seed(2)
    hr = torch.rand(2, 14, 14, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 14, 14, generator=g) > 0.2
    sr = (hr + 0.1 * torch.rand(2, 14, 14, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: cpsnr(s, hr, mask, 2), (sr,))


def test_empty_mask_gives_nan_and_is_flagged():
    hr = torch.rand(2, 20, 20, dtype=torch.float64)
    mask = torch.ones(2, 20, 20, dtype=torch.bool)
    mask[1] = False
    out = cpsnr(hr * 0.9, hr, mask)
    assert not torch.isnan(out[0]) and torch.isnan(out[1])
    assert has_clear(mask).tolist() == [True, False]
    score = kelvin_score(out, torch.tensor([40.0, 40.0], dtype=torch.float64)).item()
    assert score == pytest.approx(40.0 / out[0].item())
    with pytest.raises(ValueError, match="no scene"):
        kelvin_score(out[1:], torch.tensor([40.0]))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="share a shape"):
        cpsnr(torch.rand(1, 20, 20), torch.rand(1, 20, 21), torch.ones(1, 20, 21))
    with pytest.raises(ValueError, match="border"):
        cpsnr(torch.rand(1, 6, 6), torch.rand(1, 6, 6), torch.ones(1, 6, 6))


def test_shifted_windows_layout():
    x = torch.arange(2 * 10 * 11, dtype=torch.float64).reshape(2, 10, 11)
    w = shifted_windows(x, 2)
    assert w.shape == (2, 25, 6, 7)
    assert torch.equal(w[:, 3 * 5 + 1], x[:, 3:9, 1:8])


def test_cssim_matches_skimage_at_every_offset(cases):
    from skimage.metrics import structural_similarity
    c = cases[2]  # 70% clear
    sr, hr, sm = _tensors(c, torch.float64)
    want = -1.0
    for u in range(7):
        for v in range(7):
            m = sm[0, u:u + 378, v:v + 378].double().numpy()
            h = hr[0, u:u + 378, v:v + 378].numpy() * m
            s = sr[0, 3:381, 3:381].numpy()
            b = ((h - s * m).sum()) / m.sum()
            want = max(want, structural_similarity(h, (s + b) * m, win_size=11, data_range=1.0))
    assert cssim(sr, hr, sm).item() == pytest.approx(want, abs=1e-9)


def test_kelvin_score_of_baseline_is_one():
    c = torch.tensor([45.0, 50.0, float("nan")], dtype=torch.float64)
    assert kelvin_score(c, torch.tensor([45.0, 50.0, 30.0], dtype=torch.float64)).item() == pytest.approx(1.0)
