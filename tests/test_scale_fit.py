"""The final fit of the uncertainty on full training scenes (engine.scale_fit, ``scale_fit_epochs``)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_PIUNET, common_args

CUED = '--model_args={"n_feats": 8, "n_tefa": 1, "r_bneck": 4, "skip": "baseline", "scale_detached": true, ' \
       '"scale_cues": true}'


def _scenes(n: int = 6, t: int = 4, h: int = 8) -> list[dict]:
    """Full scenes whose HR departs from the frames more in some places than others."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lr = torch.rand(t, h, h, generator=g) * 0.3 + 0.3
        hr = torch.nn.functional.interpolate(lr.mean(0)[None, None], scale_factor=3, mode="bilinear")[0]
        rough = torch.rand(1, 3 * h, 3 * h, generator=g) < 0.3
        hr = hr + 0.05 * rough * torch.randn(hr.shape, generator=g)
        out.append(dict(lr=lr, lr_mask=torch.ones(t, h, h), hr=hr, hr_mask=torch.ones_like(hr)))
    return out


def _loss(model, scenes) -> float:
    from utils.losses import registered_l1_uncertainty
    with torch.no_grad():
        b = {k: torch.stack([s[k] for s in scenes]) for k in scenes[0]}
        out = model.super_resolve(b["lr"], b["lr_mask"])
        return registered_l1_uncertainty(out["sr"], out["log_scale"], b["hr"], b["hr_mask"]).item()


def test_the_fit_moves_the_scale_alone_and_lowers_its_loss():
    """The scale's last layers move and its Laplace loss falls; every other weight, every BatchNorm
    statistic and the SR itself stay exactly as they were, and every parameter is trainable again."""
    from engine.scale_fit import fit_scale, scale_parameters
    from models import build_model
    torch.manual_seed(0)
    model = build_model("piunet", n_feats=8, n_tefa=1, r_bneck=4, skip="baseline", scale_detached=True,
                        scale_cues=True).eval()
    scenes = _scenes()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        sr0 = model.super_resolve(torch.stack([s["lr"] for s in scenes]), torch.stack([s["lr_mask"] for s in scenes]))
    loss0 = _loss(model, scenes)
    losses = fit_scale(model, scenes, epochs=5, lr=1e-2, batch_size=2, device=torch.device("cpu"), progress=False)
    assert len(losses) == 5 and _loss(model, scenes) < loss0 - 0.05
    fitted = {id(p) for p in scale_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in fitted}
    assert names == {"conv_out_sigma.weight", "conv_out_sigma.bias", "sigma_cues.weight", "sigma_cues.bias"}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in names)
    assert all(not torch.equal(before[k], after[k]) for k in names)
    with torch.no_grad():
        sr1 = model.super_resolve(torch.stack([s["lr"] for s in scenes]), torch.stack([s["lr_mask"] for s in scenes]))
    assert torch.equal(sr0["sr"], sr1["sr"]) and not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_without_uncertainty_has_no_scale_to_fit():
    import train
    from config import ConfigError, parse_args
    from engine.scale_fit import scale_parameters
    from models import build_model
    with pytest.raises(ConfigError, match="qanet has no uncertainty"):
        train.main(["--model=qanet", "--scale_fit_epochs=2", "--plan"])
    with pytest.raises(ConfigError, match="must be 0"):
        parse_args(["--model=piunet", "--scale_fit_epochs=-1"])
    with pytest.raises(ValueError, match="no scale_fit_layers"):
        scale_parameters(build_model("qanet", n_modules=1, n_resblocks=1, n_feats=8, reduction=4))


def test_train_fits_best_pt_once_and_leaves_the_sr_and_last_pt(synthetic_root, tmp_path, capsys):
    """train.py with ``scale_fit_epochs`` rewrites best.pt: the SR weights are those of the same run
    without the fit, the scale's last layers are not, the record says what was done; last.pt is the
    training state either way, and ``--resume`` of the finished run fits nothing again."""
    import train
    from engine.checkpoint import load_checkpoint
    base = common_args(synthetic_root, tmp_path) + TINY_PIUNET + [CUED, "--epochs=2", "--holdout_fraction=0",
                                                                  "--band=NIR"]
    runs = {}
    for epochs in (0, 2):
        out = tmp_path / f"fit{epochs}"
        train.main(base + [f"--out_dir={out}", f"--scale_fit_epochs={epochs}"])
        runs[epochs] = out / "checkpoints"
    plain, fitted = load_checkpoint(runs[0] / "best.pt"), load_checkpoint(runs[2] / "best.pt")
    record = fitted["scale_fit"]
    assert record["epochs"] == 2 and record["scenes"] == 3 and len(record["loss"]) == 2
    assert "scale_fit" not in plain and "scale fitted on 3 full training scenes" in capsys.readouterr().out
    scale = ("conv_out_sigma.", "sigma_cues.")
    for k, v in plain["model"].items():
        assert torch.equal(v, fitted["model"][k]) != k.startswith(scale), k
    assert all(torch.equal(v, load_checkpoint(runs[2] / "last.pt")["model"][k])
               for k, v in load_checkpoint(runs[0] / "last.pt")["model"].items())
    stamp = (runs[2] / "best.pt").stat().st_mtime_ns
    train.main([f"--out_dir={tmp_path / 'fit2'}", "--resume"])
    assert (runs[2] / "best.pt").stat().st_mtime_ns == stamp


def test_the_plan_says_what_the_fit_will_read(synthetic_root, tmp_path, capsys):
    import json

    import train
    common = common_args(synthetic_root, tmp_path) + TINY_PIUNET + [f"--out_dir={tmp_path / 'run'}", "--plan"]
    for extra, says in (([], "none"), (["--scale_fit_epochs=2", "--band=RED"],
                                        "then 2 pass(es) over the 3 full training scenes fitting best.pt's "
                                        "uncertainty (Adam 0.01, the SR frozen)")):
        train.main(common + extra)
        out = capsys.readouterr().out.strip().splitlines()
        assert json.loads(out[-1])["scale_fit"] == says and f"scale fit: {says}" in out


def test_ctrl_c_during_the_fit_keeps_best_pt_and_resume_fits_it(synthetic_root, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the scale is fitted: exit status 130, best.pt as trained (no record), and the
    message says how to finish; ``--resume`` then fits it."""
    import engine.scale_fit
    import train
    from engine.checkpoint import load_checkpoint
    out = tmp_path / "run"
    real = engine.scale_fit.fit_scale

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.scale_fit, "fit_scale", interrupted)
    args = common_args(synthetic_root, tmp_path) + TINY_PIUNET + [CUED, "--epochs=1", "--holdout_fraction=0",
                                                                  "--band=RED", f"--out_dir={out}",
                                                                  "--scale_fit_epochs=1"]
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    assert stop.value.code == train.INTERRUPTED
    assert "its scale not fitted" in capsys.readouterr().out
    best = out / "checkpoints" / "best.pt"
    assert "scale_fit" not in load_checkpoint(best)
    monkeypatch.setattr(engine.scale_fit, "fit_scale", real)
    train.main([f"--out_dir={out}", "--resume"])
    assert load_checkpoint(best)["scale_fit"]["epochs"] == 1
