"""HighRes-net, MISR-GRU and TR-MISR against the authors' networks (../shared/fixtures/reference_zoo.pt).

Each model is built from the authors' config, loads their state dict strictly and must give their
eval-mode output; padded frames (alpha 0) must not reach the output where the authors mask them.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import shared_path
from models import build_model, highresnet, misrgru, trmisr
from models.highresnet import HighResNet, RecursiveFusion
from models.misrgru import MISRGRU, GRUFusion, convert_released_state
from models.trmisr import TRMISR, ClassTokenFusion

MODULES = {"highresnet": highresnet, "misrgru": misrgru, "trmisr": trmisr}
CLASSES = {"highresnet": HighResNet, "misrgru": MISRGRU, "trmisr": TRMISR}
NAMES = sorted(MODULES)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the tensors here are tiny: with several threads, OpenMP synchronisation costs far more than
    # the arithmetic (seconds instead of milliseconds on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def zoo() -> dict:
    return torch.load(shared_path("fixtures", "reference_zoo.pt"), weights_only=True)


def _reference_model(name: str, ref: dict) -> torch.nn.Module:
    model = CLASSES[name](**MODULES[name].kwargs_from_reference(ref["config"]))
    model.load_state_dict(ref["state_dict"], strict=True)
    return model.eval()


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_matches_authors_eval_output(zoo, name):
    ref = zoo[name]
    model = _reference_model(name, ref)
    assert _n_params(model) == ref["n_params"]
    with torch.no_grad():
        out = model(ref["inputs"]["lrs"], ref["inputs"]["alphas"])
    assert out.shape == ref["output"].shape
    assert (out - ref["output"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_the_published_config(zoo, name):
    model = CLASSES[name]()
    assert _n_params(model) == zoo[name]["n_params"]
    assert model.state_dict().keys() == zoo[name]["state_dict"].keys()
    assert CLASSES[name].registry_name == name and CLASSES[name].has_uncertainty is False


@pytest.mark.parametrize("name", NAMES)
def test_kwargs_rebuild_the_model(name):
    small = {"highresnet": dict(n_feats=8, n_resblocks=1, deconv_channels=4),
             "misrgru": dict(n_feats=8, n_resblocks=1, gru_channels=(8, 6, 4), gru_kernel_sizes=(3, 1, 3)),
             "trmisr": dict(median_reference=False, n_feats=16, depth=2, n_heads=4, mlp_dim=8)}[name]
    model = build_model(name, **small)
    again = build_model(name, **json.loads(json.dumps(model.kwargs)))  # JSON-able, as in a checkpoint
    assert again.kwargs == model.kwargs
    again.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("name", NAMES)
def test_reference_config_errors_name_the_key(zoo, name):
    config = json.loads(json.dumps(zoo[name]["config"]))
    config["encoder"]["bogus_key"] = 1
    with pytest.raises(KeyError, match="encoder.bogus_key"):
        MODULES[name].kwargs_from_reference(config)
    config = json.loads(json.dumps(zoo[name]["config"]))
    config["decoder"]["final"]["in_channels"] = 7  # must follow from the other keys
    with pytest.raises(ValueError, match="decoder.final.in_channels"):
        MODULES[name].kwargs_from_reference(config)


def test_reference_config_maps_values():
    config = {"encoder": {"in_channels": 1, "channel_size": 32}, "transformer": {"dim": 32, "heads": 4}}
    assert trmisr.kwargs_from_reference(config) == dict(median_reference=False, n_feats=32, n_heads=4)
    config = {"fusion": {"num_hidden_layers": 3, "hidden_channels": [8, 8, 16], "kernel_sizes": [3, 3, 1]},
              "decoder": {"deconv": {"in_channels": 16}}}
    assert misrgru.kwargs_from_reference(config) == dict(gru_channels=[8, 8, 16], gru_kernel_sizes=[3, 3, 1])
    config["fusion"]["num_hidden_layers"] = 2
    with pytest.raises(ValueError, match="fusion.num_hidden_layers"):
        misrgru.kwargs_from_reference(config)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_gives_finite_grads(name):
    torch.manual_seed(0)
    model = CLASSES[name]().train()
    lrs = torch.rand(2, 5, 6, 7)  # non-square frames
    alphas = torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0]])
    lrs[1, 3:] = 0
    out = model(lrs, alphas)
    assert out.shape == (2, 1, 18, 21)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_padded_frames_after_the_anchor_do_not_matter(zoo, name):
    # all three mask padding at the end: HighRes-net skips padded partners in its pairwise fusion,
    # MISR-GRU's causal GRUs never carry later frames back and its mean leaves them out, TR-MISR
    # masks them as attention keys. The anchor is the median of the first 9 frames, so padding
    # there would enter it (the authors' design); here the padding is frames 9-11.
    torch.manual_seed(1)
    model = _reference_model(name, zoo[name])
    lrs = torch.rand(2, 12, 8, 8)
    alphas = torch.ones(2, 12)
    alphas[0, 9:] = 0
    alphas[1, 10:] = 0
    lrs[alphas == 0] = 0
    noisy = lrs.clone()
    noisy[alphas == 0] = torch.rand(5, 8, 8)
    with torch.no_grad():
        a, b = model(lrs, alphas), model(noisy, alphas)
        real_changed = model(lrs.flip(-1) * (alphas[:, :, None, None] > 0), alphas)
    assert (a - b).abs().max().item() == 0
    assert (a - real_changed).abs().max().item() > 1e-4  # the check is able to see a change


@pytest.mark.parametrize("name", NAMES)
def test_padded_frames_among_the_first_nine_enter_the_anchor(zoo, name):
    # the authors' median anchor includes padded frames in the first 9: kept for their numerics
    model = _reference_model(name, zoo[name])
    lrs, alphas = torch.rand(1, 9, 8, 8), torch.ones(1, 9)
    alphas[0, 4:] = 0
    lrs[0, 4:] = 0
    with torch.no_grad():
        a = model(lrs, alphas)
        lrs[0, 4:] = 1
        b = model(lrs, alphas)
    assert (a - b).abs().max().item() > 1e-4


FUSIONS = {
    "highresnet": lambda: RecursiveFusion(8, 3, alpha_residual=True),
    "misrgru": lambda: GRUFusion(8, [8, 8], [3, 3]),
    "trmisr": lambda: ClassTokenFusion(8, 2, 2, 16, 0.0),
}


def _fusion_inputs(name: str, x: torch.Tensor, alphas: torch.Tensor) -> tuple:
    if name == "trmisr":  # one token sequence per pixel
        b, t, c, h, w = x.shape
        return x.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c), (alphas > 0).repeat_interleave(h * w, 0)
    return x, alphas


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_real", [1, 2, 5, 8])
def test_fusion_ignores_trailing_padding(name, n_real):
    # the fusion stage alone, with most frames padded and an odd count (HighRes-net drops a frame)
    torch.manual_seed(n_real)
    fusion = FUSIONS[name]().eval()
    x = torch.randn(2, 9, 8, 4, 4)
    alphas = torch.ones(2, 9)
    alphas[1, n_real:] = 0
    noisy = x.clone()
    noisy[1, n_real:] = torch.randn(9 - n_real, 8, 4, 4)
    changed = x.clone()
    changed[1, n_real - 1] = torch.randn(8, 4, 4)  # a real frame (not a constant shift: LayerNorm removes those)
    with torch.no_grad():
        a = fusion(*_fusion_inputs(name, x, alphas))
        b = fusion(*_fusion_inputs(name, noisy, alphas))
        c = fusion(*_fusion_inputs(name, changed, alphas))
    assert (a - b).abs().max().item() == 0
    assert (a - c).abs().max().item() > 1e-4


@pytest.mark.parametrize("per_sequence", [True, False], ids=["keep_per_sequence", "keep_broadcast"])
def test_trmisr_chunked_attention_matches_one_call(monkeypatch, per_sequence):
    # on CUDA TR-MISR splits the pixels' sequences into chunks (grids stop at 65535 rows); forced here
    # on CPU with chunks of 7 over 50 sequences, the last one short: same output and gradients
    torch.manual_seed(0)
    n, heads, frames, d, rows = 50, 2, 6, 4, 7
    q, k, v = (torch.randn(n, heads, frames, d, requires_grad=True) for _ in range(3))
    if per_sequence:  # (N,1,1,n) as ClassTokenFusion builds it: token 0 (the class token) always kept
        keep = torch.arange(frames) < torch.randint(1, frames + 1, (n, 1))
        assert not keep.all(1).all() and keep.all(1).any()  # some sequences padded, some not
        keep = keep[:, None, None, :]
    else:  # broadcast over the sequences
        keep = (torch.arange(frames) < 4)[None, None, None, :]
    grad_out = torch.randn(n, heads, frames, d)
    scale = 0.3

    def run(fn):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return out.detach(), grads

    sdpa = torch.nn.functional.scaled_dot_product_attention
    expected = run(lambda: sdpa(q, k, v, attn_mask=keep, scale=scale))
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(trmisr.F, "scaled_dot_product_attention", spy)
    got = run(lambda: trmisr._attention(q, k, v, keep, scale, rows))
    assert calls == [7] * 7 + [1]  # chunked, every sequence once
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    for g, e, name in zip(got[1], expected[1], "qkv", strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("padded", [False, True])
def test_trmisr_cpu_attention_matches_sdpa(padded):
    # on a CPU TR-MISR attends with two matrix products (faster than the fused kernel for 25 frames)
    # and skips the mask when every frame is real: the same output and gradients as SDPA either way
    torch.manual_seed(0)
    n, heads, frames, d = 40, 2, 6, 4
    q, k, v = (torch.randn(n, heads, frames, d, requires_grad=True) for _ in range(3))
    last = torch.randint(1, frames + 1, (n, 1)) if padded else torch.full((n, 1), frames)
    keep = (torch.arange(frames) < last)[:, None, None, :]
    assert bool(keep.all()) is not padded
    grad_out = torch.randn(n, heads, frames, d)
    results = []
    for fn in (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3),
               lambda: trmisr._attention_cpu(q, k, v, keep if padded else None, 0.3)):
        out = fn()
        results.append((out.detach(), torch.autograd.grad(out, (q, k, v), grad_out)))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def _scene_crop(scene_dir, y0: int, x0: int, size: int, frames: int) -> tuple:
    """The ``frames`` clearest LR frames of a probav scene (raw uint16) and their QMs, cropped, and the
    matching HR crop in [0,1] and its status map."""
    from PIL import Image

    def read(name: str) -> np.ndarray:
        return np.array(Image.open(scene_dir / name))

    names = sorted(p.name[2:] for p in scene_dir.glob("LR*.png"))
    lr = np.stack([read(f"LR{n}") for n in names])
    qm = np.stack([read(f"QM{n}") for n in names]).astype(bool)
    order = np.argsort(-qm.sum((1, 2)), kind="stable")[:frames]
    win = np.s_[y0:y0 + size, x0:x0 + size]
    hr_win = np.s_[3 * y0:3 * (y0 + size), 3 * x0:3 * (x0 + size)]
    hr = torch.tensor(read("HR.png")[hr_win] / 65535.0)[None]
    sm = torch.tensor(read("SM.png")[hr_win].astype(bool))[None]
    return lr[order][:, win[0], win[1]], qm[order][:, win[0], win[1]], hr, sm


def test_misrgru_released_weights_load(zoo):
    released = torch.load(shared_path("weights", "misrgru", "MISR-GRU.pth"), weights_only=True)
    assert any(k.startswith("encode.unit1.") for k in released)
    converted = convert_released_state(released)
    assert not any(k.startswith("encode.") for k in converted)
    assert convert_released_state(converted).keys() == converted.keys()  # idempotent
    assert convert_released_state(zoo["misrgru"]["state_dict"]).keys() == zoo["misrgru"]["state_dict"].keys()
    model = MISRGRU(**misrgru.kwargs_from_reference(zoo["misrgru"]["config"]))
    model.load_state_dict(converted, strict=True)
    model.eval()

    # trained weights and faithful numerics: well above the ESA baseline on a real scene
    # (measured: +4.0 dB here; a 32x32 crop, its 16 clearest frames, unregistered, as the authors feed them)
    from models.baseline import esa_baseline
    from utils.metrics import cpsnr

    lr, qm, hr, sm = _scene_crop(shared_path("probav", "val", "NIR", "imgset0596"), 40, 40, 32, 16)
    with torch.no_grad():
        sr = model(torch.tensor(lr / 65535.0, dtype=torch.float32)[None], torch.ones(1, len(lr)))
    sr = sr[0].double().clamp(0, 1)  # the authors clip to [0,1] before scoring
    baseline = torch.tensor(esa_baseline(lr, qm))[None]
    assert cpsnr(sr, hr, sm).item() > cpsnr(baseline, hr, sm).item() + 2.0


# --- the registry: what the rest of the code reads from the specs ----------------------------------------------------

def test_specs_declare_views_padding_and_hooks():
    from data.views import RECIPES, TRMISR_MAX
    from models import MODELS, spec_of
    for name in NAMES:
        spec = spec_of(name)
        assert spec.cls is CLASSES[name] and spec.trainable and not spec.uncertainty
        assert spec.views in RECIPES and spec.padding == "zeros" and not spec.uses_masks
        assert spec.frame_order_contract == "sequence"
        assert spec.reference_kwargs is MODELS[name].reference_kwargs is not None
    assert (spec_of("highresnet").n_views, spec_of("misrgru").n_views, spec_of("trmisr").n_views) == (16, 16, 24)
    assert spec_of("trmisr").train_views and not spec_of("highresnet").train_views
    assert spec_of("misrgru").convert_state is convert_released_state
    sr = torch.tensor([[[[-0.2, -0.1], [0.0, 0.9]]]])
    assert torch.allclose(spec_of("trmisr").postprocess(sr), torch.tensor([[[[0.0, 0.1], [0.2, TRMISR_MAX]]]]))
    assert spec_of("highresnet").postprocess is None  # clipped to [0,1] like every other model


@pytest.mark.parametrize("name", NAMES)
def test_from_reference_takes_the_nested_config(zoo, name):
    from models import from_reference
    ref = zoo[name]
    model = from_reference(name, ref["state_dict"], ref["config"])
    assert not model.training
    with torch.no_grad():
        out = model.super_resolve(ref["inputs"]["lrs"], None, ref["inputs"]["alphas"])["sr"]
        all_real = model(ref["inputs"]["lrs"][:1])  # alphas None: every view real
    assert (out - ref["output"]).abs().max().item() < 1e-5
    assert (all_real - ref["output"][:1]).abs().max().item() < 1e-5  # the first sample has no padding
    with pytest.raises(KeyError, match="decoder.bogus"):
        from_reference(name, config={"decoder": {"bogus": 1}})


def test_from_reference_converts_the_released_misrgru_layout(zoo):
    from models import from_reference
    released = {k.replace("unit1.", "encode.unit1.", 1) if k.startswith("unit1.") else
                k.replace("unit2.", "encode.unit2.", 1) if k.startswith("unit2.") else k: v
                for k, v in zoo["misrgru"]["state_dict"].items()}
    assert any(k.startswith("encode.unit2.") for k in released)
    model = from_reference("misrgru", {"state_dict": released}, zoo["misrgru"]["config"])
    with torch.no_grad():
        out = model(zoo["misrgru"]["inputs"]["lrs"], zoo["misrgru"]["inputs"]["alphas"])
    assert (out - zoo["misrgru"]["output"]).abs().max().item() < 1e-5


# --- the data: padding with alphas, the authors' view recipes through the dataset ------------------------------------

def _config(name: str, root, tmp_path, *extra: str):
    from config import parse_args
    return parse_args([f"--preset={name}", f"--data_dir={root}", f"--cache_dir={tmp_path / 'cache'}", *extra])


def test_training_samples_pad_with_zero_views(synthetic_root, tmp_path):
    # HighRes-net's recipe: 32 views drawn with clearance weights from scenes of 11-13 frames, then
    # zero views with alpha 0 (never clear), padding last; no frame drawn twice
    from data import build_dataset
    cfg = _config("highresnet", synthetic_root, tmp_path, "--patch_size=16", "--band=NIR")
    ds = build_dataset(cfg, "train", training=True, progress=False)
    for i in range(len(ds)):
        s = ds[i]
        n = len(ds.scenes[s["index"]]["lr"])
        assert s["lr"].shape == (32, 16, 16) and s["alphas"].tolist() == [1.0] * n + [0.0] * (32 - n)
        assert not s["lr"][n:].any() and not s["lr_mask"][n:].any() and s["lr"][:n].amax((1, 2)).gt(0).all()
        assert len({tuple(f.flatten()[:64].tolist()) for f in s["lr"][:n]}) == n  # distinct frames
    # the QA-Net recipe is unchanged: repeats, all alphas 1
    qcfg = _config("qanet", synthetic_root, tmp_path, "--patch_size=16", "--band=NIR", "--n_frames=20")
    s = build_dataset(qcfg, "train", training=True, progress=False)[0]
    assert s["lr"].shape == (20, 16, 16) and s["alphas"].eq(1).all() and s["lr"].amax((1, 2)).gt(0).all()


@pytest.mark.parametrize("name", NAMES)
def test_full_scenes_are_the_authors_views(probav_root, tmp_path, name):
    from data import build_dataset, read_scene
    from data.views import highresnet_views, trmisr_views
    cfg = _config(name, probav_root, tmp_path, "--band=RED")
    ds = build_dataset(cfg, "val", progress=False)
    index = ds.keys.index(("RED", "imgset0007"))  # 22 frames, six of them fully clear (ties)
    s = ds[index]
    scene = read_scene(probav_root / "val" / "RED" / "imgset0007")
    v = trmisr_views(scene["lr"], scene["qm"]) if name == "trmisr" else highresnet_views(scene["lr"], scene["qm"])
    assert torch.equal(s["lr"], torch.from_numpy(v.lrs)) and torch.equal(s["alphas"], torch.from_numpy(v.alphas))
    assert torch.equal(s["lr_mask"], torch.from_numpy(v.qms.astype(np.float32)))
    again = build_dataset(cfg, "val", progress=False)[index]  # from the view cache
    assert torch.equal(again["lr"], s["lr"])


def test_augmentation_keeps_the_order_of_ordered_models(synthetic_root, tmp_path):
    from data import build_dataset
    args = ("--patch_size=16", "--band=NIR", "--augment", "--train_selection=clearest")
    s = build_dataset(_config("misrgru", synthetic_root, tmp_path, *args), "train", training=True, progress=False)[0]
    plain = build_dataset(_config("misrgru", synthetic_root, tmp_path, *args[:2], args[3]), "train",
                          training=True, progress=False)[0]
    n = int(s["alphas"].sum())
    # the same frames in the same order (clearest first), the patch flipped/rotated alike
    means = s["lr"][:n].mean((1, 2))
    assert torch.allclose(means, plain["lr"][:n].mean((1, 2)), atol=1e-6) and not s["lr"][n:].any()
