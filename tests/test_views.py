"""The authors' evaluation-time view recipes (data.views): TR-MISR's and 3DWDSRNet's fixtures, tie orders,
padding."""
from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import shared_path
from data.views import (
    TRMISR_MAX,
    assemble_views,
    highresnet_views,
    order_by_clearance,
    pad_views,
    register_to_first,
    shift_reflect,
    shift_zero_fill,
    trmisr_postprocess,
    trmisr_views,
    wdsr3d_views,
)


@pytest.fixture(scope="module")
def trmisr_cases():
    from data.io import read_scene
    fixture = torch.load(shared_path("fixtures", "trmisr_pipeline.pt"), weights_only=True)
    root = shared_path("probav")
    return [(case, read_scene(root / "val" / case["band"] / case["scene"])) for case in fixture["cases"]]


def test_trmisr_views_reproduce_fixture(trmisr_cases):
    for case, scene in trmisr_cases:
        views = trmisr_views(scene["lr"], scene["qm"])
        name = case["scene"]
        assert views.frames.tolist() == case["frames_chosen"], name
        np.testing.assert_array_equal(views.shifts, np.asarray(case["shifts"]), err_msg=name)
        np.testing.assert_array_equal(views.lrs, case["lrs"].numpy(), err_msg=name)
        np.testing.assert_array_equal(views.alphas, case["alphas"].numpy(), err_msg=name)
        assert views.lrs.dtype == np.float32 and views.lrs.shape == (24, 128, 128)
    # the fixture exercises both padding (19 and 22 frames) and non-zero shifts
    assert any(np.any(case["shifts"]) for case, _ in trmisr_cases)


def test_trmisr_postprocess_and_cpsnr_reproduce_fixture(trmisr_cases):
    from utils.metrics import cpsnr
    for case, scene in trmisr_cases:
        raw = case["raw_output"]
        sr = trmisr_postprocess(raw.numpy())
        np.testing.assert_array_equal(sr, case["sr"].numpy())
        assert torch.equal(trmisr_postprocess(raw), case["sr"])  # torch path, same bits
        hr = torch.from_numpy(scene["hr"].astype(np.float64) / 65535)[None]
        score = cpsnr(torch.from_numpy(sr).double()[None], hr, torch.from_numpy(scene["sm"])[None]).item()
        assert score == pytest.approx(case["cpsnr"], abs=1e-4), case["scene"]


def test_trmisr_postprocess_range_and_per_image_minimum():
    sr = torch.tensor([[[-0.1, 0.0], [0.05, 0.9]], [[0.2, 0.3], [0.25, 0.21]]])
    out = trmisr_postprocess(sr)
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.1], [0.15, TRMISR_MAX]]))
    assert torch.allclose(out[1], torch.tensor([[0.0, 0.1], [0.05, 0.01]]))
    assert out.min() == 0 and out.max() <= TRMISR_MAX


def test_argsort_ties_crafted():
    # <= 16 frames: insertion sort (stable), reversed -> among ties, the later frame first
    c = np.array([5, 9, 5, 9, 9, 1, 5])
    assert order_by_clearance(c).tolist() == [4, 3, 1, 6, 2, 0, 5]
    # > 16 frames: the quicksort partitioning decides (neither earlier- nor later-first)
    c = np.array([3, 3, 1, 3, 2, 3, 3, 3, 1, 3, 3, 2, 3, 3, 3, 3, 3, 3, 1, 3])
    expected = [19, 10, 1, 3, 5, 6, 7, 9, 12, 13, 14, 15, 16, 17, 0, 11, 4, 18, 8, 2]
    assert order_by_clearance(c).tolist() == expected
    # NumPy's 8/16-bit argsort still runs the classic introsort that NumPy used for every dtype
    # before its SIMD sorts: the replay must agree with it on the same values
    assert np.argsort(c.astype(np.int16))[::-1].tolist() == expected


def test_argsort_ties_match_numpy_classic_quicksort():
    rng = np.random.default_rng(0)
    for _ in range(500):
        c = rng.integers(0, rng.integers(1, 5), rng.integers(1, 36))  # PROBA-V scenes: 9 to 35 frames
        assert order_by_clearance(c).tolist() == np.argsort(c.astype(np.int16))[::-1].tolist(), c.tolist()


def test_argsort_ties_on_real_scenes(trmisr_cases):
    # imgset0007 (RED) has six fully clear frames among 22: the tie order picks the median reference
    for _, scene in trmisr_cases:
        counts = scene["qm"].reshape(len(scene["qm"]), -1).sum(1)
        expected = np.argsort(counts.astype(np.int16))[::-1][:16]
        np.testing.assert_array_equal(highresnet_views(scene["lr"], scene["qm"]).frames, expected)


def test_nlargest_ties_and_masks():
    rng = np.random.default_rng(1)
    for _ in range(200):
        c = rng.integers(0, 4, rng.integers(1, 36))
        assert order_by_clearance(c, ties="nlargest").tolist() == heapq.nlargest(len(c), range(len(c)), c.take)
    qm = np.zeros((4, 8, 8), bool)
    qm[0, :2] = qm[1, :5] = qm[2, :5] = qm[3, :1] = True
    assert order_by_clearance(qm, ties="nlargest").tolist() == [1, 2, 0, 3]
    assert order_by_clearance(qm * np.uint8(255)).tolist() == [2, 1, 0, 3]  # 0/255 QMs: same order
    with pytest.raises(ValueError):
        order_by_clearance(qm, ties="stable")


def _unit(a) -> np.ndarray:
    return (np.asarray(a, np.float64) / 65535).astype(np.float32)


def test_pad_views_fewer_than_n():
    lr = np.array([[[0, 65535]], [[1, 2]], [[3, 4]]], np.uint16)  # (3, 1, 2)
    qm = np.array([[[1, 0]], [[1, 1]], [[0, 1]]], bool)
    lrs, qms, alphas = pad_views(lr, qm, [2, 0], n=5)
    assert lrs.shape == (5, 1, 2) and lrs.dtype == np.float32
    np.testing.assert_array_equal(lrs[:2], _unit([[[3, 4]], [[0, 65535]]]))
    assert lrs[1, 0, 1] == 1.0
    assert not lrs[2:].any() and not qms[2:].any()
    np.testing.assert_array_equal(qms[:2], qm[[2, 0]])
    np.testing.assert_array_equal(alphas, [1, 1, 0, 0, 0])
    lrs, _, alphas = pad_views(lr, qm, [1, 2, 0], n=2)  # more than n: the first n kept
    np.testing.assert_array_equal(lrs, _unit(lr[[1, 2]]))
    np.testing.assert_array_equal(alphas, [1, 1])


def test_highresnet_views_order_and_padding():
    rng = np.random.default_rng(2)
    qm = np.ones((10, 16, 16), bool)
    qm[[1, 4], :3] = False  # frames 1, 4 less clear; the other 8 tie
    lr = rng.integers(0, 2**14, (10, 16, 16)).astype(np.uint16)
    v = highresnet_views(lr, qm, n=16)
    assert v.frames.tolist() == [9, 8, 7, 6, 5, 3, 2, 0, 4, 1]
    np.testing.assert_array_equal(v.alphas, [1] * 10 + [0] * 6)
    np.testing.assert_array_equal(v.lrs[:10], _unit(lr[v.frames]))
    assert not v.lrs[10:].any() and not v.shifts.any()


@pytest.mark.parametrize("shift", [(0, 0), (1, 0), (0, -1), (-3, 2), (5, 5), (-20, 0), (16, 3)])
def test_shift_zero_fill_matches_ndimage(shift):
    img = np.random.default_rng(3).integers(0, 65535, (16, 16)).astype(np.uint16)
    expected = ndimage.shift(img, np.array(shift, float), mode="constant", cval=0)
    np.testing.assert_array_equal(shift_zero_fill(img, shift), expected)
    # masks: ndimage.shift truncates its spline values on bool output and so loses clear pixels
    # (TR-MISR's val.py does that to its QMs, which its network never reads); as uint8 it is exact
    mask = img > 30000
    expected = ndimage.shift(mask.astype(np.uint8), np.array(shift, float), mode="constant", cval=0)
    np.testing.assert_array_equal(shift_zero_fill(mask, shift), expected.astype(bool))


def test_register_to_first_recovers_a_known_shift():
    rng = np.random.default_rng(4)
    # 128x128: at overlap ratio 0.99 a one-pixel shift (127/128 overlap) is allowed, not on smaller frames
    base = ndimage.gaussian_filter(rng.random((128, 128)), 2)
    lr = np.stack([base, np.roll(base, 1, axis=0), np.roll(base, -1, axis=1)])
    lr = (lr / lr.max() * 30000).astype(np.uint16)
    qm = np.ones_like(lr, bool)
    lr_reg, qm_reg, shifts = register_to_first(lr, qm)
    assert shifts.tolist() == [[0, 0], [-1, 0], [0, 1]]
    np.testing.assert_array_equal(lr_reg[1, :-1], lr[0, :-1])
    assert not lr_reg[1, -1].any() and not qm_reg[1, -1].any() and qm_reg[1, :-1].all()
    np.testing.assert_array_equal(lr_reg[0], lr[0])


@pytest.mark.parametrize("shift", [(0, 0), (1, 0), (0, -1), (2, -3), (-5, 4)])
def test_shift_reflect_is_scipys_reflect_for_integer_shifts(shift):
    """3DWDSRNet moves its frames with ``ndimage.shift(mode='reflect')``: the edge mirrored in."""
    img = np.random.default_rng(0).integers(0, 16000, (2, 9, 11)).astype(np.float64)
    expected = np.stack([ndimage.shift(f, shift, mode="reflect") for f in img])
    np.testing.assert_allclose(shift_reflect(img, shift), expected, atol=1e-9)
    lr, qm = img.astype(np.uint16), np.ones(img.shape, bool)
    v = assemble_views(lr, qm, [1], [shift], 1, fill="reflect")
    np.testing.assert_allclose(v.lrs[0] * 65535.0, np.round(expected[1]), atol=1e-3)
    assert v.qms[0].sum() == (9 - abs(shift[0])) * (11 - abs(shift[1]))  # the mask moves in zeros


def test_wdsr3d_recipe_is_the_authors(probav_root):
    """Frames chosen, every frame's registration shift and the registered frames fed, as the author's
    preprocessing gave them (../shared/fixtures/wdsr3d_reference.pt)."""
    from data.io import read_scene
    ref = torch.load(shared_path("fixtures", "wdsr3d_reference.pt"), weights_only=True)
    for case in ref["cases"]:
        scene = read_scene(probav_root / "val" / case["band"] / case["scene"])
        v = wdsr3d_views(scene["lr"], scene["qm"], 7)
        assert v.frames.tolist() == list(case["frames"]) and v.alphas.tolist() == [1.0] * 7
        shifts = np.asarray(case["shifts"], np.int64)
        np.testing.assert_array_equal(v.shifts, shifts[v.frames])
        np.testing.assert_array_equal(v.lrs * 65535.0, case["lrs"].numpy())


def test_wdsr3d_recipe_drops_dirty_frames_as_the_author_does():
    """More than 15% masked: dropped, except frame 0 alone (the author tests np.any of the indices);
    every frame dirty: all kept (the author skips the scene); fewer than 7: seeded random repeats."""
    rng = np.random.default_rng(1)
    base = ndimage.gaussian_filter(rng.normal(5000, 2000, (32, 32)), 2)  # one smooth scene: no shift found
    lr = (base + rng.normal(0, 5, (4, 32, 32))).astype(np.uint16)

    def chosen(dirty: list[int]) -> list[int]:
        qm = np.ones(lr.shape, bool)
        for i in dirty:
            qm[i, :8 + i] = False  # more masked for a later frame: a distinct order
        return wdsr3d_views(lr, qm, 7).frames.tolist()

    assert chosen([]) == [0, 1, 2, 3] + chosen([])[4:] and len(chosen([])) == 7
    assert set(chosen([2])) == {0, 1, 3} and set(chosen([0])) == {0, 1, 2, 3}
    assert set(chosen([0, 2])) == {1, 3}
    assert chosen([0, 1, 2, 3])[:4] == [0, 1, 2, 3]  # all dirty: the least masked first
    assert chosen([2]) == chosen([2])  # the repeats are seeded: the same every time
