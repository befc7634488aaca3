"""utils.uncertainty against direct NumPy computations on small synthetic scenes."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from utils.metrics import cpsnr
from utils.uncertainty import UncertaintyReport, reliability_image, reliability_plot, scene_errors, spearman

BORDER = 3


@pytest.fixture(scope="module")
def batch():
    """B=3 scenes of 48x48: SR is the HR window at a scene-specific offset (not the centre), darker
    by a constant, plus noise; the status maps have random haze and a rectangular cloud; scene 2
    has no clear pixel at all."""
    rng = np.random.default_rng(0)
    B, H = 3, 48
    h = H - 2 * BORDER
    hr = rng.uniform(0.1, 0.6, (B, H, H))
    sr = np.full((B, H, H), 0.3)
    offsets = [(1, 5), (4, 2), (3, 3)]
    for i, (u, v) in enumerate(offsets):
        sr[i, BORDER:-BORDER, BORDER:-BORDER] = hr[i, u:u + h, v:v + h] - 0.04 + rng.normal(0, 0.01, (h, h))
    mask = rng.uniform(size=(B, H, H)) > 0.3
    mask[0, 5:20, 10:30] = False
    mask[1, 20:40, 0:25] = False
    mask[2] = False
    log_scale = rng.normal(-5, 1, (B, H, H))
    as_t = lambda a: torch.from_numpy(a)[:, None]  # noqa: E731  (B,1,H,W) like the models' output
    return {"sr": as_t(sr), "log_scale": as_t(log_scale), "hr": as_t(hr), "mask": as_t(mask), "offsets": offsets}


def _direct(sr, log_scale, hr, mask, border=BORDER):
    """The cPSNR registration written out: loop over the offsets, keep the lowest cMSE (first on a
    tie), remove that offset's bias; abs errors and exp(log_scale) at the clear pixels."""
    H, W = sr.shape
    h, w = H - 2 * border, W - 2 * border
    x = sr[border:H - border, border:W - border]
    best = (np.inf, None, None)
    for u in range(2 * border + 1):
        for v in range(2 * border + 1):
            m = mask[u:u + h, v:v + w]
            if not m.any():
                continue
            d = (hr[u:u + h, v:v + w] - x)[m]
            b = d.mean()
            cmse = np.mean((d - b) ** 2)
            if cmse < best[0]:
                best = (cmse, (u, v), b)
    if best[1] is None:
        return None
    _, (u, v), b = best
    m = mask[u:u + h, v:v + w]
    err = np.abs(hr[u:u + h, v:v + w] - x - b)[m]
    return err, np.exp(log_scale[border:H - border, border:W - border][m]), (u, v), best[0]


def test_scene_errors_matches_direct_numpy(batch):
    got = scene_errors(batch["sr"], batch["log_scale"], batch["hr"], batch["mask"])
    assert len(got) == 3
    for i in range(3):
        want = _direct(*(batch[k][i, 0].numpy() for k in ("sr", "log_scale", "hr", "mask")))
        if want is None:
            assert got[i] is None
            continue
        err, scale, offset, _ = want
        assert got[i].offset == offset == batch["offsets"][i]
        assert got[i].errors.dtype == np.float64 and got[i].scales.dtype == np.float64
        assert got[i].errors.shape == err.shape and got[i].errors.ndim == 1
        np.testing.assert_allclose(got[i].errors, err, rtol=0, atol=1e-10)
        np.testing.assert_allclose(got[i].scales, scale, rtol=1e-12)
    assert got[2] is None  # the cloud-covered scene is skipped, as the metric skips it


def test_scene_errors_agree_with_cpsnr(batch):
    """The kept errors are exactly the ones cpsnr() scores: their variance is its best cMSE."""
    got = scene_errors(batch["sr"], batch["log_scale"], batch["hr"], batch["mask"])
    psnr = cpsnr(batch["sr"], batch["hr"], batch["mask"])
    for i in range(2):
        u, v = got[i].offset
        sr, hr, m = (batch[k][i, 0].numpy() for k in ("sr", "hr", "mask"))
        h = sr.shape[0] - 2 * BORDER
        signed = (hr[u:u + h, v:v + h] - sr[BORDER:-BORDER, BORDER:-BORDER])[m[u:u + h, v:v + h]]
        cmse = np.mean((signed - signed.mean()) ** 2)
        np.testing.assert_allclose(np.mean(got[i].errors ** 2), cmse, rtol=1e-9)
        assert abs(-10 * np.log10(cmse) - psnr[i].item()) < 1e-6
    assert torch.isnan(psnr[2])


def test_scene_errors_rejects_mismatched_log_scale(batch):
    with pytest.raises(ValueError, match="log_scale"):
        scene_errors(batch["sr"], batch["log_scale"][:, :, :-1], batch["hr"], batch["mask"])


def _avg_ranks(x):
    """1-based ranks, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def test_spearman_matches_numpy_ranks():
    rng = np.random.default_rng(1)
    for a, b in [(rng.normal(size=200), rng.normal(size=200)),
                 (rng.integers(0, 5, 300).astype(float), rng.integers(0, 7, 300).astype(float)),  # many ties
                 (np.arange(50.0), np.arange(50.0) ** 3)]:
        want = np.corrcoef(_avg_ranks(a), _avg_ranks(b))[0, 1]
        assert abs(spearman(a, b) - want) < 1e-12
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.ones(10), np.arange(10.0)))  # constant: undefined, no warning
    assert np.isnan(spearman([1.0], [2.0]))


def _numpy_calibration(errors, scales, n_bins=10):
    edges = np.quantile(scales, np.linspace(0, 1, n_bins + 1))
    rows = []
    for k in range(n_bins):
        inside = (scales >= edges[k]) & ((scales < edges[k + 1]) if k < n_bins - 1 else (scales <= edges[k + 1]))
        rows.append((inside.sum(), scales[inside].mean() if inside.any() else None,
                     errors[inside].mean() if inside.any() else None))
    return rows


def _random_report(rng):
    rep = UncertaintyReport()
    data = {"NIR": ([], []), "RED": ([], [])}
    for i in range(7):
        band = "NIR" if i % 2 else "RED"
        n = int(rng.integers(50, 400))
        s = rng.lognormal(-5, 1, n).astype(np.float32).astype(np.float64)  # float32-exact: stored as such
        e = (s * rng.exponential(1.0, n)).astype(np.float32).astype(np.float64)
        rep.add(f"scene{i}", band, e, s)
        data[band][0].append(e)
        data[band][1].append(s)
    rep.add("cloudy", "RED", None, None)
    return rep, {b: (np.concatenate(e), np.concatenate(s)) for b, (e, s) in data.items()}


def test_report_tables_match_numpy():
    rep, data = _random_report(np.random.default_rng(2))
    data["all"] = tuple(np.concatenate([data["NIR"][j], data["RED"][j]]) for j in range(2))
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))  # strict JSON: no NaN
    assert set(d["bands"]) == {"NIR", "RED", "all"}
    assert d["skipped"] == [{"scene": "cloudy", "band": "RED"}] and d["bands"]["RED"]["skipped"] == ["cloudy"]
    assert d["bands"]["NIR"]["skipped"] == [] and len(d["scenes"]) == 7
    for band, (e, s) in data.items():
        g = d["bands"][band]
        assert g["n_pixels"] == e.size
        assert g["mean_error"] == pytest.approx(e.mean(), rel=1e-9)
        assert g["mean_scale"] == pytest.approx(s.mean(), rel=1e-9)
        rhos = [spearman(r[1], r[0]) for r in _scene_arrays(rep, band)]
        assert g["spearman_mean"] == pytest.approx(np.mean(rhos), rel=1e-12) and g["n_scenes"] == len(rhos)
        want = _numpy_calibration(e, s)
        assert len(g["calibration"]) == 10
        for row, (n, ms, me) in zip(g["calibration"], want, strict=True):
            assert row["n"] == n and row["mean_scale"] == pytest.approx(ms, rel=1e-6)
            assert row["mean_error"] == pytest.approx(me, rel=1e-6)
        # deciles of distinct values: near-equal counts, increasing scales
        assert max(r["n"] for r in g["calibration"]) - min(r["n"] for r in g["calibration"]) <= 2
        assert np.all(np.diff([r["mean_scale"] for r in g["calibration"]]) > 0)
    for scene in d["scenes"]:
        e, s = next(x for x in _scene_arrays(rep, "all", with_names=True) if x[2] == scene["scene"])[:2]
        assert scene["spearman"] == pytest.approx(spearman(s, e), rel=1e-12)
    text = rep.table()
    assert "NIR" in text and "RED" in text and "all" in text and len(text.splitlines()) > 30


def _scene_arrays(rep, band, with_names=False):
    """(errors, scales[, name]) of the scenes of ``band`` as the report stored them."""
    chunks = rep._chunks(band)
    names = [r["scene"] for r in rep.scenes if band == "all" or r["band"] == band]
    if band == "all":  # _chunks("all") is ordered by band
        names = [r["scene"] for b in rep.bands() for r in rep.scenes if r["band"] == b]
    return [(e.astype(np.float64), s.astype(np.float64)) + ((n,) if with_names else ())
            for (e, s), n in zip(chunks, names, strict=True)]


def test_calibration_with_tied_scales():
    """A constant predicted scale (e.g. an untrained head) puts every pixel in one bin."""
    rep = UncertaintyReport()
    rep.add("a", "NIR", np.arange(100.0) / 1000, np.full(100, 0.01))
    cal = rep.calibration("NIR")
    assert [r["n"] for r in cal] == [0] * 9 + [100]
    assert cal[0]["mean_error"] is None and cal[-1]["mean_error"] == pytest.approx(0.0495)
    assert rep.to_dict()["scenes"][0]["spearman"] is None
    assert "-" in rep.table()


def test_add_batch_and_calibrated_laplace_case():
    """SR = HR - Laplace(b) noise on a textured scene: after registration the decile mean errors
    match the mean predicted scales (to ~10%), and doubling the noise would break that."""
    rng = np.random.default_rng(3)
    B, H = 4, 96
    hr = rng.uniform(0.1, 0.9, (B, H, H))
    log_b = rng.uniform(np.log(0.002), np.log(0.05), (B, H, H))
    results = {}
    for factor in (1.0, 2.0):
        sr = hr - rng.laplace(0.0, factor * np.exp(log_b))
        t = lambda a: torch.from_numpy(a)[:, None]  # noqa: E731
        mask = np.ones((B, H, H), bool)
        mask[-1] = False
        rep = UncertaintyReport()
        rep.add_batch([f"s{i}" for i in range(B)], ["NIR", "RED"] * (B // 2), t(sr), t(log_b), t(hr), t(mask))
        d = rep.to_dict()
        assert [r["scene"] for r in d["skipped"]] == ["s3"] and d["bands"]["all"]["n_scenes"] == 3
        assert d["bands"]["all"]["n_pixels"] == 3 * (H - 2 * BORDER) ** 2
        results[factor] = [r["mean_error"] / r["mean_scale"] for r in d["bands"]["all"]["calibration"]]
        assert d["bands"]["all"]["spearman_mean"] > 0.3
    assert all(abs(r - 1) < 0.1 for r in results[1.0]), results[1.0]
    assert all(abs(r - 2) < 0.2 for r in results[2.0]), results[2.0]


def test_reliability_plot_writes_png(tmp_path):
    rep, _ = _random_report(np.random.default_rng(4))
    path = tmp_path / "reliability.png"
    reliability_plot(rep, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    reliability_plot(json.loads(json.dumps(rep.to_dict())), tmp_path / "again.png")  # from summary.json
    img = reliability_image(rep)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.min() < img.max()
    empty = reliability_image(UncertaintyReport())  # nothing scored: still an image
    assert empty.shape[2] == 3


def test_import_does_not_load_matplotlib():
    code = "import sys, utils.uncertainty; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_valid_reports_the_uncertainty_of_a_tiny_piunet(synthetic_root, tmp_path, capsys):
    """valid.py on a tiny PIUnet: per-scene Spearman and the decile table of summary.json agree with
    the NumPy computation on the model's own outputs; the plot is written; the baseline adds nothing."""
    import valid
    from config import parse_args
    from data import build_dataset
    from engine.checkpoint import save_checkpoint
    from models import build_model

    torch.manual_seed(0)
    cfg = parse_args(["--preset=piunet", f"--data_dir={synthetic_root}", f"--cache_dir={tmp_path / 'c'}",
                      "--band=all", "--device=cpu", '--model_args={"n_feats": 8, "n_tefa": 1, "r_bneck": 4}'])
    model = build_model("piunet", **cfg.model_args).eval()
    with torch.no_grad():  # random BatchNorm statistics, so the scale varies over the image
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, model=model, config=cfg.to_dict())
    valid.main([f"--checkpoint={ckpt}", f"--out_dir={tmp_path / 'v'}", "--device=cpu"])
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())["uncertainty"]
    assert (tmp_path / "v" / "reliability.png").stat().st_size > 1000
    assert "calibration by quantile bin" in capsys.readouterr().out

    ds = build_dataset(cfg, "val", progress=False)
    pooled_e, pooled_s = [], []
    for i in range(len(ds)):
        s = ds[i]
        with torch.no_grad():
            out = model.super_resolve(s["lr"][None], s["lr_mask"][None])
        sr, log_scale = out["sr"].clamp(0, 1)[0, 0].double().numpy(), out["log_scale"][0, 0].double().numpy()
        err, scale, _, _ = _direct(sr, log_scale, s["hr"][0].double().numpy(), s["hr_mask"][0].numpy() > 0.5)
        row = next(r for r in summary["scenes"] if r["scene"] == s["name"])
        assert row["spearman"] == pytest.approx(np.corrcoef(_avg_ranks(scale), _avg_ranks(err))[0, 1], abs=1e-6)
        assert row["mean_error"] == pytest.approx(err.mean(), rel=1e-4)
        pooled_e.append(err)
        pooled_s.append(scale)
    want = _numpy_calibration(np.concatenate(pooled_e).astype(np.float32), np.concatenate(pooled_s).astype(np.float32))
    got = summary["bands"]["all"]["calibration"]
    for row, (n, ms, me) in zip(got, want, strict=True):  # float32 pixels: a few may change bin at an edge
        assert row["n"] == pytest.approx(n, rel=1e-3) and row["mean_scale"] == pytest.approx(ms, rel=1e-3)
        assert row["mean_error"] == pytest.approx(me, rel=1e-3)

    valid.main(["--model=baseline", f"--data_dir={synthetic_root}", f"--cache_dir={tmp_path / 'c'}",
                f"--out_dir={tmp_path / 'b'}", "--device=cpu"])
    assert "uncertainty" not in json.loads((tmp_path / "b" / "summary.json").read_text())
    assert not (tmp_path / "b" / "reliability.png").exists()


def _tiny_piunet_checkpoint(root, tmp_path, loss: str):
    """A tiny PIUnet saved as a run trained with ``loss`` would save it (its config names the loss)."""
    from config import parse_args
    from engine.checkpoint import save_checkpoint
    from models import build_model
    cfg = parse_args(["--preset=piunet", f"--data_dir={root}", f"--cache_dir={tmp_path / 'c'}", "--band=all",
                      "--device=cpu", '--model_args={"n_feats": 8, "n_tefa": 1, "r_bneck": 4}', f"--loss={loss}",
                      "--warmup_loss=", "--warmup_epochs=0"])
    torch.manual_seed(0)
    path = tmp_path / f"{loss}.pt"
    save_checkpoint(path, model=build_model("piunet", **cfg.model_args).eval(), config=cfg.to_dict())
    return path


def test_a_scale_no_loss_trained_is_reported_as_such(synthetic_root, tmp_path, capsys):
    """A checkpoint trained with a loss that never reads the scale (registered L1) says so in valid.py's
    uncertainty report and summary.json and when predict.py exports the maps; one whose loss reads
    it does not."""
    import predict
    import valid
    from engine.checkpoint import load_checkpoint, uncertainty_trained
    untrained = _tiny_piunet_checkpoint(synthetic_root, tmp_path, "l1_reg")
    trained = _tiny_piunet_checkpoint(synthetic_root, tmp_path, "l1_reg_scale")
    assert uncertainty_trained(load_checkpoint(untrained)) is False
    assert uncertainty_trained(load_checkpoint(trained)) is True
    for path, warned in ((untrained, True), (trained, False)):
        out = tmp_path / f"v-{path.stem}"
        valid.main([f"--checkpoint={path}", f"--out_dir={out}", "--device=cpu"])
        err = capsys.readouterr().err
        assert ("uncertainty was never trained: its loss (l1_reg)" in err) is warned
        assert json.loads((out / "summary.json").read_text())["uncertainty"]["trained"] is not warned
        predict.main([f"--checkpoint={path}", f"--out_dir={tmp_path / f'p-{path.stem}'}", "--export_uncertainty"])
        assert ("never trained" in capsys.readouterr().err) is warned
        assert list((tmp_path / f"p-{path.stem}" / "uncertainty").glob("*.npy"))
    del_config = load_checkpoint(untrained)
    del_config.pop("uncertainty_trained")  # a checkpoint of an earlier version: derived from its config
    assert uncertainty_trained(del_config) is False and uncertainty_trained({"config": None}) is None


@pytest.mark.parametrize("cues", [False, True])
def test_the_scale_loss_on_detached_features_leaves_the_sr_as_registered_l1_trains_it(tmp_path, cues):
    """``l1_reg_scale`` with ``scale_detached``: every SR weight after a few steps is what ``l1_reg`` gives
    (bit for bit), while the uncertainty head, which ``l1_reg`` never reaches, is trained; with the
    error cues (``scale_cues``) too, which read the SR detached."""
    from config import parse_args
    from engine.keeper import CheckpointKeeper
    from engine.trainer import Trainer
    from utils.runtime import Dist
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        lr = torch.rand(2, 4, 8, 8, generator=g) * 0.3 + 0.1
        hr = torch.nn.functional.interpolate(lr[:, :1], scale_factor=3, mode="bilinear")
        mask = (torch.rand(2, 4, 8, 8, generator=g) > 0.2).float()
        hr = hr + 0.01 * torch.rand(hr.shape, generator=g)
        batches.append(dict(lr=lr, lr_mask=mask, alphas=torch.ones(2, 4), hr=hr, hr_mask=torch.ones_like(hr),
                            name=["a", "b"]))
    nets = {}
    for loss in ("l1_reg", "l1_reg_scale"):
        cfg = parse_args(["--model=piunet", "--device=cpu", "--n_frames=4", "--patch_size=8", "--batch_size=2",
                          '--model_args={"n_feats": 8, "n_tefa": 1, "r_bneck": 4, "skip": "baseline", '
                          f'"scale_detached": true, "scale_cues": {str(cues).lower()}}}', f"--loss={loss}", "--lr=1e-2",
                          "--channels_last=false"])
        torch.manual_seed(0)
        trainer = Trainer(cfg, Dist(), torch.device("cpu"))
        it, keeper = iter(batches), CheckpointKeeper(tmp_path / loss, 0, 0.0)
        for _ in range(3):
            trainer.train_step(it, keeper)
        nets[loss] = dict(trainer.net.named_parameters())
    head = {k for k in nets["l1_reg"] if "sigma" in k}
    assert any(k.startswith("sigma_cues") for k in head) is cues
    sr_part = [k for k in nets["l1_reg"] if k not in head]
    assert head and all(torch.equal(nets["l1_reg"][k], nets["l1_reg_scale"][k]) for k in sr_part)
    assert all(not torch.equal(nets["l1_reg"][k], nets["l1_reg_scale"][k]) for k in head if k.endswith("weight"))


def test_error_cues_start_at_nothing_and_follow_the_sr_contrast_and_the_frames():
    """``scale_cues`` adds a zero-initialised map of the cues: the first outputs are those of the model
    without it; the contrast cues are larger where the SR has more local contrast, and finite on a
    flat SR; the frames' cue is at its floor for frames that are the SR downscaled (up to each
    frame's brightness), and rises where one frame departs from it."""
    from models import PIUnet
    from models.piunet import CUE_WIDTHS, error_cues
    torch.manual_seed(0)
    plain = PIUnet(n_feats=8, n_tefa=1, r_bneck=4, scale_detached=True).eval()
    cued = PIUnet(n_feats=8, n_tefa=1, r_bneck=4, scale_detached=True, scale_cues=True).eval()
    missing, unexpected = cued.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"sigma_cues.weight", "sigma_cues.bias"} and not unexpected
    lr = torch.rand(2, 4, 10, 10)
    a, b = plain.super_resolve(lr), cued.super_resolve(lr)
    assert torch.equal(a["sr"], b["sr"]) and torch.equal(a["log_scale"], b["log_scale"])
    mu = torch.zeros(1, 1, 30, 30)
    mu[..., 15:] = 1.0  # one vertical edge
    frames = torch.nn.functional.avg_pool2d(mu, 3).expand(1, 3, 10, 10) + torch.tensor([0.0, 0.3, -0.2])[:, None, None]
    cues = error_cues(mu, frames, 3)
    assert cues.shape == (1, len(CUE_WIDTHS) + 1, 30, 30) and torch.isfinite(cues).all()
    for c in range(len(CUE_WIDTHS)):  # contrast: higher next to the edge than far from it
        assert cues[0, c, 10, 14] > cues[0, c, 10, 0]
    floor = torch.full((30, 30), math.log(1e-3))
    assert torch.allclose(cues[0, -1], floor)  # every frame is the SR downscaled, brighter or darker
    frames = frames.clone()
    frames[0, 1, 2, 2] += 1.0  # one frame sees something the SR does not show
    cues = error_cues(mu, frames, 3)
    assert cues[0, -1, 7, 7] > cues[0, -1, 25, 25] + 3  # there, not across the frame (e^3: 20 times)


def test_a_checkpoint_of_the_earlier_cues_is_refused_naming_the_file(tmp_path):
    """The first ``scale_cues`` read the frames' spread where the cues now read their disagreement
    with the SR, through a convolution named ``cues_sigma``: such a checkpoint would give a wrong
    scale, so ``valid.py``/``predict.py`` refuse it, naming the file and the key, rather than read it."""
    from engine.checkpoint import CheckpointError, model_from_checkpoint
    from models import build_model
    model = build_model("piunet", n_feats=8, n_tefa=1, r_bneck=4, scale_detached=True, scale_cues=True)
    state = {k.replace("sigma_cues", "cues_sigma"): v for k, v in model.state_dict().items()}
    path = tmp_path / "earlier_cues.pt"
    torch.save({"model_name": "piunet", "model_kwargs": dict(model.kwargs), "model": state, "config": None}, path)
    with pytest.raises(CheckpointError, match="earlier_cues.pt.*cues_sigma"):
        model_from_checkpoint(path)


def test_a_run_with_cues_starts_from_a_checkpoint_without_them(tmp_path):
    """``train.py --checkpoint`` of a PIUnet trained without ``scale_cues`` into one with them: every
    weight it has is taken, the cues stay at zero; a checkpoint that misses any other part is refused,
    naming the file."""
    from engine.checkpoint import CheckpointError, load_initial_weights
    from models import build_model
    torch.manual_seed(0)
    small = dict(n_feats=8, n_tefa=1, r_bneck=4, scale_detached=True)
    old = build_model("piunet", **small)
    path = tmp_path / "old.pt"
    torch.save({"model_name": "piunet", "model_kwargs": dict(old.kwargs), "model": old.state_dict(), "config": None},
               path)
    new = build_model("piunet", **small, scale_cues=True)
    load_initial_weights(new, path, "piunet", dict(new.kwargs))
    state = new.state_dict()
    assert all(torch.equal(state[k], v) for k, v in old.state_dict().items())
    assert not state["sigma_cues.weight"].any() and not state["sigma_cues.bias"].any()
    wider = build_model("piunet", n_feats=12, n_tefa=1, r_bneck=4, scale_detached=True)
    with pytest.raises(CheckpointError, match="old.pt.*do not fit"):
        load_initial_weights(wider, path, "piunet", dict(small))
    deeper = build_model("piunet", n_feats=8, n_tefa=2, r_bneck=4, scale_detached=True)
    with pytest.raises(CheckpointError, match="old.pt.*missing key"):
        load_initial_weights(deeper, path, "piunet", dict(small))
