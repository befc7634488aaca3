"""config.py: presets, typed --key=value overrides, and errors that list the valid choices."""
from __future__ import annotations

import dataclasses

import pytest

from config import PRESETS, Config, ConfigError, parse_args


def test_presets_follow_the_published_recipes():
    q = parse_args(["--preset=qanet"])
    assert (q.model, q.lr, q.weight_decay, q.batch_size, q.patch_size, q.n_frames) == ("qanet", 1e-4, 1e-5, 10, 32, 9)
    assert q.lr_milestones == (120, 220, 300, 360, 400, 440, 480) and q.lr_gamma == 0.8 and q.lr_unit == "epoch"
    assert (q.grad_clip, q.train_selection, q.beta, q.epochs, q.loss) == (15.0, "weighted", 50.0, 520, "cpsnr")
    p = parse_args(["--preset=piunet"])
    assert (p.model, p.lr, p.batch_size, p.patch_size, p.n_frames, p.epochs) == ("piunet", 1e-4, 24, 32, 9, 750)
    assert (p.lr_milestones, p.lr_gamma, p.lr_unit, p.grad_clip) == ((150_000,), 0.2, "step", 15.0)
    assert (p.warmup_loss, p.warmup_epochs, p.loss) == ("l1_reg_std", 1, "l1u_reg")
    assert (p.band, p.val_every, p.best_metric) == ("NIR", 1, "cpsnr")  # one model per band, as the authors
    assert (q.patches, q.window, q.window_stride, q.window_min_clear, q.frame_order) == ("windows", 64, 32, 0.85,
                                                                                         "shuffled")
    d = parse_args(["--preset=demo"])
    assert d.synthetic and d.device == "cpu"
    for name in PRESETS:
        assert parse_args([f"--preset={name}"]).preset == name


def test_overrides_are_typed_and_applied_after_the_preset():
    c = parse_args(["--preset=piunet", "--batch_size=4", "--lr=3e-4", "--band=RED", "--lr_milestones=10,20",
                    '--model_args={"n_feats": 8}', "--ensemble", "--compile=false"])
    assert (c.batch_size, c.lr, c.band, c.lr_milestones) == (4, 3e-4, "RED", (10, 20))
    assert c.model_args == {"n_feats": 8} and c.ensemble is True and c.compile is False
    assert c.model == "piunet"  # from the preset
    assert parse_args(["--batch-size=3"]).batch_size == 3  # dashes work too


@pytest.mark.parametrize("argv, match", [
    (["--learning_rate=1"], "unknown option --learning_rate; valid options: .*accum_steps"),
    (["--band=GREEN"], "choose from 'NIR', 'RED', 'all'"),
    (["--preset=fast"], "unknown preset 'fast'; choose from qanet, piunet, demo"),
    (["--batch_size=ten"], "expected an integer"),
    (["--lr=fast"], "expected a number"),
    (["--ensemble=maybe"], "expected true or false"),
    (["--model_args=[1]"], "expected a JSON object"),
    (["--batch_size"], "needs a value"),
    (["batch_size=3"], "use --key=value"),
    (["--batch_size=0"], "must be at least 1"),
    (["--amp=fp8"], "choose from 'off', 'bf16', 'fp16'"),
    (["--cuda_graphs=true", "--compile=true"], "choose one"),
    # the data options' rules, from data.DatasetOptions (one home), as config errors
    (["--patches=windows", "--window=16", "--patch_size=32"], "window=16 is smaller than patch_size=32"),
    (["--repeats=0"], "repeats must be at least 1"),
])
def test_bad_arguments_are_errors_that_say_what_is_valid(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_config_is_frozen_and_round_trips_through_a_dict():
    c = parse_args(["--preset=demo", "--seed=3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 4
    assert Config.from_dict(c.to_dict()) == c
    # a checkpoint written by a version with an extra key still loads
    assert Config.from_dict({**c.to_dict(), "retired_option": 1}) == c


def test_every_preset_only_sets_known_fields():
    names = {f.name for f in dataclasses.fields(Config)}
    for preset, values in PRESETS.items():
        assert set(values) <= names, preset
