"""models.wdsr3d: 3DWDSRNet reproduces the author's TensorFlow network with the released weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import shared_path
from models.wdsr3d import WDSR3D, load_released, postprocess, state_from_tf, tf_layer_order
from utils.tfcheckpoint import read_tf_checkpoint

DN = 65535.0
TOL_DN = 0.02  # float32 rounding of outputs near 10^4 DN (measured: at most 0.008 DN)
FOLDERS = {"NIR": "wdsr-32-8-6-7-nir-all", "RED": "wdsr-32-8-6-7-red-all"}


@pytest.fixture(scope="module")
def reference():
    return torch.load(shared_path("fixtures", "wdsr3d_reference.pt"), weights_only=True)


@pytest.fixture(scope="module")
def released():
    cache = {}

    def get(band: str) -> WDSR3D:
        if band not in cache:
            cache[band] = load_released(shared_path("weights", "wdsr3d", FOLDERS[band]))
        return cache[band]
    return get


def expected_parameters(n_feats=32, n_resblocks=8, expansion=6, low_rank=0.8, n_frames=7, scale=3) -> int:
    """v, g and bias of every convolution of the author's wdsr_3d, counted by hand."""
    def conv(c_in, c_out, k, dims=3):
        return c_out * c_in * k ** dims + 2 * c_out
    narrow, s2 = int(n_feats * low_rank), scale * scale
    block = conv(n_feats, n_feats * expansion, 1) + conv(n_feats * expansion, narrow, 1) + conv(narrow, n_feats, 3)
    return (conv(1, n_feats, 3) + n_resblocks * block + n_frames // 3 * conv(n_feats, n_feats, 3)
            + conv(n_feats, s2, 3) + conv(1, s2, 3, 2) + conv(s2, s2, 3, 2))


def test_parameter_count():
    model = WDSR3D()
    assert sum(p.numel() for p in model.parameters()) == expected_parameters() == 329_328
    small = WDSR3D(n_feats=8, n_resblocks=2, expansion=2, n_frames=9)
    assert sum(p.numel() for p in small.parameters()) == expected_parameters(8, 2, 2, n_frames=9)
    from models import build_model  # the registry records the arguments a checkpoint rebuilds it from
    assert build_model("wdsr3d").kwargs == dict(scale=3, n_feats=32, n_resblocks=8, expansion=6, low_rank=0.8,
                                                n_frames=7, tile=32)
    with pytest.raises(ValueError, match="n_frames=6"):
        WDSR3D(n_frames=6)


def test_depth_to_space_order_is_pixel_shuffle():
    # TF's depth_to_space (NHWC): out[h*3+i, w*3+j, c] = in[h, w, (i*3+j)*C + c]; with C = 1 it is pixel_shuffle
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 9)).astype(np.float32)
    tf_like = x.reshape(2, 4, 5, 3, 3).transpose(0, 1, 3, 2, 4).reshape(2, 12, 15)
    ours = F.pixel_shuffle(torch.from_numpy(x).permute(0, 3, 1, 2), 3)[:, 0]
    assert np.array_equal(ours.numpy(), tf_like)


def test_weight_norm_and_training_step():
    torch.manual_seed(0)
    model = WDSR3D(n_feats=8, n_resblocks=1, expansion=2, n_frames=5, tile=8)
    conv = model.blocks[0].conv
    assert torch.allclose(conv.weight(), conv.v)  # the author's start: g = ||v||
    with torch.no_grad():
        conv.g.mul_(torch.linspace(-2, 2, 8))
    norms = conv.weight().flatten(1).norm(dim=1)
    assert torch.allclose(norms, conv.g.abs(), atol=1e-6)
    lr = torch.rand(2, 5, 20, 12) * 0.2  # 20 = tiles at rows 0, 8 and 12 (the last moved back)
    sr = model.super_resolve(lr, torch.ones_like(lr))["sr"]
    assert sr.shape == (2, 1, 60, 36)
    padded = F.pad(torch.cat([lr, lr.mean(1, keepdim=True)], 1), (1, 1, 1, 1), mode="reflect")
    last = padded[:, :, 12:22, 4:14]  # the tile of LR rows 12-19, columns 4-11, with its border
    assert torch.allclose(sr[:, :, 36:60, 12:36], model(last[:, :-1], last[:, -1:]), atol=1e-6)
    sr.square().mean().backward()
    named = dict(model.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values()), \
        [n for n, p in named.items() if p.grad is None or p.grad.abs().sum() == 0]
    with pytest.raises(ValueError, match="built for 5 frames"):
        model.super_resolve(lr[:, :4])


def test_postprocess_clips_and_rounds():
    sr = np.array([-0.1, 0.5, 1.5, 100.4 / DN, 100.6 / DN], dtype=np.float32)
    want = np.array([0, 32768 / DN, 65536 / DN, 100 / DN, 101 / DN], dtype=np.float32)
    assert np.allclose(postprocess(sr) * DN, want * DN, atol=1e-3) and postprocess(sr).dtype == np.float32
    assert torch.allclose(postprocess(torch.from_numpy(sr)) * DN, torch.from_numpy(want) * DN, atol=1e-3)


def test_layer_mapping_checks_shapes():
    folder = shared_path("weights", "wdsr3d", FOLDERS["NIR"])
    order = tf_layer_order()
    assert len(order) == 30 and order[27:] == ["skip1", "tail", "skip2"]
    names = [f"model/layer_with_weights-{k}/{v}/.ATTRIBUTES/VARIABLE_VALUE" for k in (27, 28, 29)
             for v in ("v", "g", "layer/bias")]
    tail = read_tf_checkpoint(folder, names)
    with pytest.raises(KeyError, match="layer_with_weights-0/v"):
        state_from_tf(tail)
    swapped = {k.replace("-27/", "-X/").replace("-28/", "-27/").replace("-X/", "-28/"): v for k, v in tail.items()}
    with pytest.raises(ValueError, match=r"layer_with_weights-27/v: shape \(3, 3, 3, 32, 9\)"):
        state_from_tf({**read_tf_checkpoint(folder, [n.replace("-27/", f"-{k}/") for k in range(27)
                                                     for n in names[:3]]), **swapped})


@pytest.mark.parametrize("band", ["NIR", "RED"])
def test_released_network_matches_author(band, reference, released):
    entry = reference["model"][band]
    lrs = entry["inputs"][..., 0].permute(0, 3, 1, 2) / DN  # (B,H,W,T,1) -> (B,T,H,W)
    mean = entry["merged"].permute(0, 3, 1, 2) / DN
    with torch.no_grad():
        out = released(band)(lrs, mean) * DN
    diff = (out - entry["outputs"].permute(0, 3, 1, 2)).abs().max().item()
    print(f"{band}: network vs author, max |diff| = {diff:.4f} DN")
    assert out.shape == (2, 1, 96, 96) and diff < TOL_DN


@pytest.mark.parametrize("band", ["NIR", "RED"])
def test_super_resolve_reproduces_author_scene(band, reference, released):
    case = next(c for c in reference["cases"] if c["band"] == band)
    assert torch.equal(case["lrs"].mean(0), case["mean"])  # the mean frame is the plain mean of the 7
    with torch.no_grad():
        sr = released(band).super_resolve(case["lrs"][None] / DN)["sr"][0, 0]
    raw = case["raw"]
    diff = (sr * DN - raw).abs().max().item()
    print(f"{band} {case['scene']}: tiled SR vs author, max |diff| = {diff:.4f} DN")
    assert sr.shape == (384, 384) and diff < TOL_DN
    # after the author's clip and round, whole DN; only values within float rounding of a half may round otherwise
    off = (postprocess(sr) * DN - case["sr"]).abs()
    near_half = (raw - raw.floor() - 0.5).abs() < TOL_DN
    assert off.max() <= 1.001 and not (off[~near_half] > 1e-3).any()


def test_whole_frame_differs_from_tiles_only_near_seams(reference, released):
    """Tiles see zero padding ('same' convolutions) and reflections at their borders, where the
    whole frame sees its neighbours: on a 64x64 crop (one seam each way, at LR 32) the two agree
    from 11 LR pixels off the seam (the network's reach) and differ by hundreds of DN on it."""
    model = released("NIR")
    lr = reference["cases"][0]["lrs"][None, :, 40:104, 40:104] / DN
    with torch.no_grad():
        tiled = model.super_resolve(lr)["sr"][0, 0] * DN
        model.tile = 0
        try:
            whole = model.super_resolve(lr)["sr"][0, 0] * DN
        finally:
            model.tile = 32
    diff = (tiled - whole).abs()
    lr_pixel = torch.arange(192) // 3
    to_seam = torch.minimum((lr_pixel - 32).abs(), (lr_pixel + 1 - 32).abs())  # 0 for LR 31 and 32
    dist = torch.minimum(to_seam[:, None], to_seam[None, :])
    print(f"whole frame vs tiles: max {diff.max():.1f} DN on the seam, {diff[dist >= 11].max():.4f} DN "
          f"from 11 LR pixels off it")
    assert diff[dist >= 11].max() < TOL_DN
    assert diff[dist == 0].max() > 100
