"""The one configuration of training, validation and prediction.

A frozen :class:`Config` with documented defaults, named :data:`PRESETS`, and ``--key=value``
overrides checked against the field types::

    python train.py --preset=piunet --band=RED --batch_size=16 --model_args='{"n_tefa": 8}'

``--preset`` is applied first, then the overrides in order. A bare ``--flag`` sets a boolean field
to true. Unknown keys and bad values are errors that list the valid choices. The resolved config is
written to every run folder (``config.json``) and into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field

from data import BANDS, FRAME_ORDERS, PATCHES, SELECTIONS, SPLITS, dataset_options
from models import MODELS, model_kwargs
from utils.losses import LOSSES
from utils.runtime import AMP_DTYPES

__all__ = ["Config", "PRESETS", "CommandLine", "parse_command", "parse_args", "ConfigError", "CHOICES"]


# fields renamed since earlier versions (old name -> new), read from older checkpoints' configs
RENAMED = {"select_fraction": "holdout_fraction", "select_metric": "best_metric"}


class ConfigError(ValueError):
    """An unknown key or a bad value on the command line or in a preset."""


def opt(default, help: str):
    """A config field with its default and the one-line help that ``--help`` prints."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # --- what and where -----------------------------------------------------------------------
    preset: str = opt("qanet", "the preset these values started from (see PRESETS)")
    model: str = opt("qanet", "the network (models.MODELS); an untrainable one (the ESA baseline) for valid/predict")
    model_args: dict = opt({}, "constructor arguments of the model (JSON on the CLI)")
    data_dir: str = opt("datasets/probav", "a root in the Kelvin layout: train/, [val/], test/, norm.csv")
    synthetic: bool = opt(False, "generate synthetic scenes into data_dir when it does not exist")
    band: str = opt("all", "NIR | RED | all (one model for both bands)")
    split: str = opt("val", "the split that validation (train.py) and valid.py score")
    out_dir: str = opt("", "run folder; empty: results/<preset>-<band>-<timestamp> (valid/predict: by the checkpoint)")
    checkpoint: str = opt("", "train.py: initial weights (ours or the authors'); valid/predict: the model to use")
    resume: bool = opt(False, "train.py: continue the run in out_dir from checkpoints/last.pt")
    seed: int = opt(0, "seeds weights, patches, frame draws, sample order and the split carves")
    device: str = opt("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    amp: str = opt("off", "off | bf16 | fp16 (CUDA; fp16 uses a gradient scaler)")
    compile: bool = opt(False, "torch.compile the model for training")
    cuda_graphs: bool = opt(False, "replay the training forward+backward as CUDA graphs (one CUDA process, no compile)")
    channels_last: bool = opt(True, "NHWC features (models.request_channels_last): 1.1-1.3x faster training on CPU")

    # --- data --------------------------------------------------------------------------------
    n_frames: int = opt(9, "frames per scene given to the model")
    train_selection: str = opt("weighted", "clearest | weighted | coverage | all (data.select_frames)")
    val_selection: str = opt("coverage", "frame selection of full scenes (validation, valid.py, predict.py)")
    beta: float = opt(50.0, "temperature of the clearance-weighted sampling")
    patch_size: int = opt(32, "LR training patch side (HR patches are 3x)")
    min_clear: float = opt(0.25, "a training patch with a smaller HR clear fraction is redrawn (grid: left out)")
    patches: str = opt("windows", "random crops | grid: the non-overlapping patches (PIUnet) | windows: a random crop "
                                 "in each kept sub-scene window (QA-Net)")
    window: int = opt(64, "patches=windows: LR window side (TR-MISR's sub-scenes)")
    window_stride: int = opt(32, "patches=windows: stride between windows")
    window_min_clear: float = opt(0.85, "patches=windows: a window is kept when the mean of all its quality maps "
                                        "is at least this")
    frame_order: str = opt("shuffled", "order of the selected frames, one rule for training and evaluation: as "
                                        "selected | shuffled (seeded per scene at evaluation) | clearest_first")
    register: bool = opt(False, "align frames and masks to the clearest frame once per scene (data.register_frames)")
    min_frame_clearance: float = opt(0.0, "select only frames clearer than this (PIUnet: 0.85); train scenes "
                                     "without one are dropped, val/test scenes fall back to their clearest frame")
    repeats: int = opt(1, "random patches drawn per scene per epoch")
    drop_unclear_eval: bool = opt(False, "also leave out val/holdout scenes with no frame clearer than "
                                         "min_frame_clearance (PIUnet's preprocessing); train scenes always are")
    fill_clouds: bool = opt(False, "replace cloudy LR pixels by the median of the clear frames (data.fill_clouds)")
    augment: bool = opt(False, "random flips/90-degree rotations and frame order of training samples")
    num_workers: int = opt(2, "data-loader worker processes (0: load in the main process)")
    cache_dir: str = opt("results/cache", "decoded scenes (.npz), rebuilt when a PNG changes")
    val_fraction: float = opt(0.1, "carve of val/ from train/ when the root has none")
    holdout_fraction: float = opt(0.0, "share of train/ scenes held out to choose best.pt (0: choose on `split`)")
    val_scenes: int = opt(0, "validate on the first N scenes per band only (0: all)")

    # --- optimisation --------------------------------------------------------------------------
    epochs: int = opt(520, "training epochs")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: no limit)")
    max_minutes: float = opt(0.0, "stop training after this many minutes, then validate and save (0: no limit)")
    batch_size: int = opt(10, "per process")
    accum_steps: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-4, "Adam learning rate")
    weight_decay: float = opt(1e-5, "Adam weight decay")
    lr_milestones: tuple = opt((120, 220, 300, 360, 400, 440, 480), "where the learning rate is multiplied by lr_gamma")
    lr_gamma: float = opt(0.8, "factor of each learning-rate drop")
    lr_unit: str = opt("epoch", "epoch | step: what lr_milestones count; plateau: x lr_gamma after lr_patience "
                       "validations without a better score (ReduceLROnPlateau; HighRes-net, MISR-GRU, TR-MISR)")
    lr_patience: int = opt(2, "lr_unit=plateau: validations without improvement before the learning rate drops")
    grad_clip: float = opt(15.0, "max gradient norm (0: off)")
    ema: float = opt(0.0, "decay of an exponential moving average of the weights, validated and saved (0: off)")
    loss: str = opt("cpsnr", "the training loss (utils.losses.LOSSES)")
    warmup_loss: str = opt("", "a loss used for the first warmup_epochs epochs (PIUnet: l1_reg)")
    warmup_epochs: int = opt(0, "epochs trained with warmup_loss")
    scale_fit_epochs: int = opt(0, "after training, passes over the full training scenes (val_batch_size per step) "
                                   "fitting the last layers of best.pt's uncertainty, the SR frozen "
                                   "(engine.scale_fit; 0: off)")
    scale_fit_lr: float = opt(1e-2, "Adam learning rate of that fit")

    # --- logging and evaluation --------------------------------------------------------------------
    val_every: int = opt(5, "epochs between validations (and best.pt updates)")
    best_metric: str = opt("score", "what best.pt is chosen on: score (Kelvin score over the bands trained) | "
                                      "cpsnr (mean cPSNR)")
    plan: bool = opt(False, "train.py: print the data, steps, schedule and validation of the run, then exit "
                            "without training or writing anything")
    log_every: int = opt(10, "optimizer steps between TensorBoard scalars")
    n_images: int = opt(3, "validation scenes shown as comparison panels")
    val_batch_size: int = opt(4, "full scenes per forward pass at validation")
    ensemble: bool = opt(False, "valid/predict: average over flips, rotations (and frame orders where "
                                  "frame_order=shuffled)")
    save_png: bool = opt(False, "valid.py: write SR images as 16-bit PNGs")
    checkpoint_nir: str = opt("", "predict.py: the NIR band's checkpoint (one checkpoint per band)")
    checkpoint_red: str = opt("", "predict.py: the RED band's checkpoint")
    export_uncertainty: bool = opt(False, "predict.py: also write PIUnet's uncertainty maps")
    force: bool = opt(False, "predict.py: replace an existing submission.zip")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Rebuild from :meth:`to_dict` output (a checkpoint); keys this version lacks are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {RENAMED.get(k, k): v for k, v in d.items()}  # checkpoints of earlier versions
        if d.get("split") == "select":
            d["split"] = "holdout"
        d = {k: v for k, v in d.items() if k in names}
        if "lr_milestones" in d:
            d["lr_milestones"] = tuple(d["lr_milestones"])
        return cls(**d)

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


# the choices of each field, from the tables that own them (lr_unit and best_metric are config's own)
CHOICES = {
    "model": tuple(MODELS),
    "band": BANDS + ("all",),
    "split": SPLITS,
    "amp": tuple(AMP_DTYPES),
    "train_selection": tuple(SELECTIONS),
    "val_selection": tuple(SELECTIONS),
    "lr_unit": ("epoch", "step", "plateau"),
    "loss": tuple(LOSSES),
    "warmup_loss": ("",) + tuple(LOSSES),
    "patches": tuple(PATCHES),
    "frame_order": tuple(FRAME_ORDERS),
    "best_metric": ("score", "cpsnr"),
}

# Presets: the authors' published recipes, a demo that runs in minutes on a laptop CPU, and small
# models for real scenes on a CPU. Each states only what differs from Config's defaults, which are
# the qanet recipe.
PRESETS: dict[str, dict] = {
    # QA-Net (Kim et al.) as its authors train it: TR-MISR's sub-scenes (the 64x64 LR windows at
    # stride 32 whose mean quality is at least 0.85), one random 32x32 crop per kept window per epoch,
    # 9 frames drawn with clearance weights (beta 50) and fed in a random order (at evaluation the
    # coverage pick in a seeded random order), Adam 1e-4, wd 1e-5, batch 10, cPSNR loss, MultiStepLR
    # x0.8 at epochs 120-480, clipping 15, 520 epochs.
    "qanet": {},  # Config's defaults are this recipe
    # PIUnet (Valsesia & Magli), one model per band (--band=NIR or --band=RED): frames and masks
    # registered to the clearest frame, the 9 clearest of the frames more than 85% clear (training
    # scenes without one dropped), the fixed grid of non-overlapping 32x32 patches more than 10%
    # clear, Adam 1e-4, batch 24, lr x0.2 after 150k iterations (76% of training on NIR), clipping 15,
    # registered L1 in standardised units for the first epoch, then registered L1-uncertainty, 750
    # epochs, validated every epoch on the val scenes that have a frame more than 85% clear, best.pt
    # on the band's cPSNR.
    "piunet": dict(model="piunet", band="NIR", epochs=750, batch_size=24, weight_decay=0.0,
                   train_selection="clearest", val_selection="clearest", register=True, min_frame_clearance=0.85,
                   patches="grid", min_clear=0.1, lr_milestones=(150_000,), lr_gamma=0.2, lr_unit="step",
                   loss="l1u_reg", warmup_loss="l1_reg_std", warmup_epochs=1, val_every=1, best_metric="cpsnr",
                   drop_unclear_eval=True, frame_order="selection"),
    # Synthetic scenes (generated on first use), a small PIUnet that starts from the ESA baseline and
    # learns a residual on it, fed cloud-filled frames, flips/rotations, a moving average of the
    # weights, the uncertainty head trained on the SR's error (l1_reg_scale, detached: the SR as under
    # registered L1); CPU, under 5 minutes on 2 cores, about 0.8 dB above the ESA baseline. One validation,
    # at the end: best.pt is the last weights, chosen on nothing.
    "demo": dict(model="piunet", model_args=dict(n_feats=16, n_tefa=2, r_bneck=4, skip="baseline",
                                                scale_detached=True),
                 data_dir="datasets/synthetic", synthetic=True, device="cpu", epochs=22, batch_size=8, repeats=4,
                 train_selection="clearest", val_selection="clearest", fill_clouds=True, augment=True, ema=0.99,
                 lr=1e-3, weight_decay=0.0, lr_milestones=(17,), lr_gamma=0.2, loss="l1_reg_scale", val_every=22,
                 num_workers=0, patches="random", frame_order="selection"),
    # Real scenes (../shared/probav or any small root) on a CPU in under 30 minutes: a small PIUnet
    # that starts from the ESA baseline and learns a residual on it, flips/rotations, a moving
    # average of the weights, best.pt chosen on 10% of the train scenes held out; about 13 minutes
    # of training on 2 cores, stopped at 26 minutes on a slower machine. The uncertainty head learns
    # the SR's error (l1_reg_scale) on detached features, with error cues at the SR's resolution
    # (scale_cues): only registered L1 reaches the SR. Then its last layers are fitted on the full
    # training scenes (scale_fit_epochs, about 100 s): training saw patches, valid/predict see scenes.
    "cpu_real": dict(model="piunet", model_args=dict(n_feats=16, n_tefa=2, r_bneck=4, skip="baseline",
                                                    scale_detached=True, scale_cues=True), augment=True,
                     ema=0.995, holdout_fraction=0.1, device="cpu", max_minutes=26.0, epochs=45, batch_size=8,
                     repeats=4, train_selection="clearest", val_selection="clearest", fill_clouds=True, lr=1e-3,
                     weight_decay=0.0, lr_milestones=(34,), lr_gamma=0.2, loss="l1_reg_scale", val_every=10,
                     num_workers=0, patches="random", frame_order="selection", scale_fit_epochs=3),
    # Real scenes on a CPU in under 30 minutes, QA-Net: a reduced QA-Net (2 LEM/QEM pairs of two RCABs,
    # 24 features) that starts from the ESA baseline of its frames and learns a residual on it in
    # standardised units (frames in and residual out in units of the dataset's standard deviation),
    # flips/rotations (frames and quality maps alike; frames clearest first, at training as at
    # evaluation), a moving average of the weights, best.pt chosen on 10% of the train scenes held out.
    "cpu_real_qanet": dict(model_args=dict(n_modules=2, n_resblocks=2, n_feats=24, reduction=4, skip="baseline",
                                          standardize=True),
                           augment=True, ema=0.995, holdout_fraction=0.1, device="cpu", max_minutes=28.0, epochs=30,
                           batch_size=8, repeats=4, patches="random", train_selection="clearest",
                           val_selection="clearest", frame_order="clearest_first", fill_clouds=True, lr=1e-3,
                           weight_decay=0.0, lr_milestones=(23,), lr_gamma=0.2, loss="l1_reg", val_every=10,
                           num_workers=0),
    # HighRes-net (Deudon et al.), its config.json "training": 64x64 LR patches at random (no clearance
    # test), 32 views drawn with clearance weights (beta 50) in draw order, zero views (alpha 0) up to 32,
    # Adam 7e-4, ReduceLROnPlateau x0.97 after 2 validations without a better score, validated every
    # epoch, 400 epochs, batch 32. Their loss is -cPSNR after ShiftNet's learned sub-pixel shift of the
    # SR; ours is the cPSNR searched over the metric's 49 integer shifts (cpsnr_shift), no ShiftNet.
    "highresnet": dict(model="highresnet", epochs=400, batch_size=32, lr=7e-4, weight_decay=0.0, patch_size=64,
                       patches="random", min_clear=0.0, n_frames=32, val_selection="clearest", lr_unit="plateau",
                       lr_gamma=0.97, lr_milestones=(), grad_clip=0.0, loss="cpsnr_shift", val_every=1,
                       frame_order="selection"),
    # MISR-GRU (Rifat Arefin et al.): HighRes-net's recipe with 24 views and batch 16 (their config.json).
    "misrgru": dict(model="misrgru", epochs=400, batch_size=16, lr=7e-4, weight_decay=0.0, patch_size=64,
                    patches="random", min_clear=0.0, n_frames=24, val_selection="clearest", lr_unit="plateau",
                    lr_gamma=0.97, lr_milestones=(), grad_clip=0.0, loss="cpsnr_shift", val_every=1,
                    frame_order="selection"),
    # TR-MISR (An et al.), its config.json "training": the 24 clearest views registered to the first, zero
    # views up to 24 (the model's recipe, for training too), 64x64 LR patches mostly clear (85%), Adam 1e-3
    # for the encoder and decoder and 5e-4 for the transformer (ModelSpec.lr_scale), x0.95 on plateaus of
    # the validation score, validated every epoch, 400 epochs, batch 4, loss -cPSNR over the 49 shifts.
    "trmisr": dict(model="trmisr", epochs=400, batch_size=4, lr=1e-3, weight_decay=0.0, patch_size=64,
                   patches="grid", min_clear=0.85, n_frames=24, train_selection="clearest", val_selection="clearest",
                   lr_unit="plateau", lr_gamma=0.95, lr_milestones=(), grad_clip=0.0, loss="cpsnr_shift",
                   val_every=1, frame_order="selection"),
    # 3DWDSRNet (Dorr), its train.py and dataset/preprocessing.py: one model per band, the author's 7
    # registered views (the model's recipe, for training too), 32x32 LR patches of the 4x4 grid whose HR
    # is more than 85% clear, training scenes without a frame 85% clear left out, L1 after the brightness
    # bias at the best of the 49 shifts (registered L1), batch 32, a constant 5e-4 (Adam for their Nadam),
    # 100 epochs.
    "wdsr3d": dict(model="wdsr3d", band="NIR", epochs=100, batch_size=32, lr=5e-4, weight_decay=0.0, n_frames=7,
                   patches="grid", min_clear=0.85, min_frame_clearance=0.85, train_selection="clearest",
                   val_selection="clearest", lr_milestones=(), grad_clip=0.0, loss="l1_reg", val_every=1,
                   best_metric="cpsnr", frame_order="selection"),
}


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _parse_value(key: str, raw: str, typ: type):
    if key in CHOICES and raw not in CHOICES[key]:
        raise ConfigError(f"--{key}={raw!r}: choose from {', '.join(repr(c) for c in CHOICES[key])}")
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is tuple:
            items = json.loads(raw) if raw.strip().startswith("[") else [x for x in raw.split(",") if x.strip()]
            return tuple(int(x) for x in items)
        if typ is dict:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (ValueError, json.JSONDecodeError):
        kind = {bool: "true or false", int: "an integer", float: "a number",
                tuple: "a comma-separated list of integers", dict: "a JSON object, e.g. '{\"n_feats\": 16}'"}[typ]
        raise ConfigError(f"--{key}={raw!r}: expected {kind}") from None
    return raw


def _check(cfg: Config) -> Config:
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: choose from {', '.join(repr(c) for c in choices)}")
    for key in ("epochs", "batch_size", "accum_steps", "n_frames", "patch_size", "val_every",
                "log_every", "val_batch_size", "window", "window_stride"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be at least 1")
    if cfg.scale_fit_epochs < 0:
        raise ConfigError(f"scale_fit_epochs={cfg.scale_fit_epochs} must be 0 (off) or more")
    if not 0.0 <= cfg.ema < 1.0:
        raise ConfigError(f"ema={cfg.ema} must lie in [0, 1): the decay of the weights' moving average")
    for key in ("min_clear", "min_frame_clearance", "holdout_fraction", "window_min_clear"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must lie in [0, 1]")
    try:  # the data options' own rules (repeats, window at least the patch, ...): data.DatasetOptions
        dataset_options(cfg, training=True, progress=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.cuda_graphs and cfg.compile:
        raise ConfigError("cuda_graphs=true and compile=true: choose one (compile has its own graph mode)")
    # graphs and fp16 on the device the run lands on: engine.trainer.check_placement, once it is open
    try:  # one source of truth for the frame count, checked before any data loads
        model_kwargs(cfg.model, cfg.model_args, cfg.n_frames)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


@dataclass(frozen=True)
class CommandLine:
    """A parsed command line: the resolved config, and what the command line itself said.

    ``explicit`` holds the keys given on the command line (``preset`` included when given);
    ``overrides`` their parsed values in order, ``preset`` left out. :meth:`onto` applies the same
    overrides to another config, e.g. the one a checkpoint was trained with.
    """

    config: Config
    explicit: frozenset
    overrides: tuple

    def onto(self, base: Config, **forced) -> Config:
        """``base`` changed where this command line says so (``--preset`` ignored: ``base`` already
        is a complete config), then ``forced`` on top; checked like :func:`parse_args`."""
        return _check(base.replace(**dict(self.overrides)).replace(**forced))


def _split_pairs(argv: list[str], types: dict) -> list[tuple[str, str | None]]:
    """``[(key, raw value or None for a bare flag)]`` of ``--key=value`` arguments; ``--help`` prints
    the options and exits."""
    pairs: list[tuple[str, str | None]] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value (see --help)")
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types:
            raise ConfigError(f"unknown option --{key}; valid options: {', '.join(sorted(types))}")
        if not eq and types[key] is not bool:
            raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
        pairs.append((key, raw if eq else None))
    return pairs


def parse_command(argv: list[str] | None = None, base: Config | None = None) -> CommandLine:
    """Parse ``--preset=NAME`` and ``--key=value`` arguments (``sys.argv[1:]`` when None).

    ``--preset`` is applied first (default: ``base``'s preset, else the default preset), then the overrides in
    order. ``base``, when its preset is the one asked for, is the config the overrides apply to.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    types = _field_types()
    pairs = _split_pairs(argv, types)
    preset = base.preset if base is not None else Config().preset
    for key, raw in pairs:
        if key == "preset":
            preset = raw or ""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = base if base is not None and base.preset == preset else Config(preset=preset).replace(**PRESETS[preset])
    overrides = tuple((key, True if raw is None else _parse_value(key, raw, types[key]))
                      for key, raw in pairs if key != "preset")
    return CommandLine(_check(cfg.replace(**dict(overrides))), frozenset(k for k, _ in pairs), overrides)


def parse_args(argv: list[str] | None = None, base: Config | None = None) -> Config:
    """A :class:`Config` from ``--preset=NAME`` and ``--key=value`` arguments (see :func:`parse_command`,
    which also says which keys the command line set).

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
        base: the config to start from (default: the ``qanet`` preset).
    """
    return parse_command(argv, base).config


def help_text() -> str:
    """Every option with its default, choices and help (the field's metadata)."""
    lines = ["Options (--key=value); presets: " + ", ".join(PRESETS)]
    defaults = Config()
    for f in dataclasses.fields(Config):
        choices = f"  ({' | '.join(map(str, CHOICES[f.name]))})" if f.name in CHOICES else ""
        lines.append(f"  --{f.name}={getattr(defaults, f.name)!r}{choices}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
