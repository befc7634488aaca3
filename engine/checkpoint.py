"""Self-describing checkpoints: everything needed to rebuild the model or resume the run.

A checkpoint is a dict::

    {"format": 2, "model_name": a key of models.MODELS, "model_kwargs": {...}, "model": state_dict,
     "optimizer": ..., "scheduler": ..., "scaler": ..., "epoch": completed epochs,
     "step": optimizer steps, "step_in_epoch": steps done in the current epoch,
     "best_score": the best rank_value so far (engine.keeper.rank_value, lower is better) or None,
     "config": the resolved Config as a dict, "rng": RNG states,
     "uncertainty_trained": whether a loss of the run read the model's uncertainty output}

It is written atomically, holds only tensors and plain Python values (lists, dicts, strings,
numbers, None), and is read with ``torch.load(..., weights_only=True)``: a checkpoint is a pickle,
and a full unpickler would run whatever code a shared file carries. A file that needs more (a
pickled class or function) is refused with a :class:`CheckpointError` before anything in it runs.
Checkpoints of format 1 (before RNG states were stored as tensors) hold one NumPy array; they still
load, with only NumPy's array and dtype reconstruction allowed, which builds data and runs no code.

``valid.py`` and ``predict.py`` rebuild the model from it alone; they also accept the authors'
released state dicts (bare, or wrapped in ``"state_dict"``, in any key layout the model's spec can
convert: ``ModelSpec.convert_state``), given the model name. Weights that do not fit are refused
with an error naming the file, the first missing, unexpected and misshapen keys, and the model
whose keys they do fit, if any.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from config import CommandLine, Config, ConfigError
from models import MODELS, TRAINABLE, build_model, check_frames, model_kwargs, name_of, released_state, spec_of
from utils.losses import LOSSES, run_losses
from utils.runtime import atomic_torch_save, check_amp, resolve_device

from .layout import RunFolder

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "load_initial_weights",
           "load_for_eval",
           "EvalSetup", "unwrap", "uncertainty_trained", "losses_train_uncertainty", "untrained_scale_warning"]

FORMAT = 2  # 2: RNG states as tensors and plain values (weights_only); 1: NumPy's RNG state as an array

# What format-1 checkpoints need beyond weights_only's defaults: NumPy array reconstruction, data only.
_FORMAT1_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


class CheckpointError(ValueError):
    """A checkpoint file is missing or is not something a model can be built from."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def losses_train_uncertainty(config: dict) -> bool:
    """Whether the losses of a run's config (its ``loss``, and ``warmup_loss`` for its warm-up epochs)
    read the uncertainty output: only then is the predicted scale trained."""
    names = run_losses(config.get("loss", ""), config.get("warmup_loss", ""), config.get("warmup_epochs", 0))
    return any(name in LOSSES and LOSSES[name].uses_uncertainty for name in names)


def uncertainty_trained(ckpt: dict) -> bool | None:
    """Whether the checkpoint's uncertainty output was trained: recorded by the run, derived from
    its config for checkpoints of earlier versions; None for the authors' files (no config: their
    own training, which PIUnet's authors ran with the uncertainty loss)."""
    if "uncertainty_trained" in ckpt:
        return bool(ckpt["uncertainty_trained"])
    return losses_train_uncertainty(ckpt["config"]) if ckpt.get("config") else None


def untrained_scale_warning(ckpt: dict) -> str:
    """The warning for a checkpoint whose uncertainty output no loss ever trained ("" otherwise)."""
    if uncertainty_trained(ckpt) is not False:
        return ""
    loss = ckpt["config"].get("loss", "?")
    return (f"warning: this checkpoint's uncertainty was never trained: its loss ({loss}) does not read the "
            f"scale, so the scale is what the initialisation gives and does not track the error; train with "
            f"--loss=l1_reg_scale or l1u_reg for a scale that does")


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                    epoch: int = 0, step: int = 0, step_in_epoch: int = 0, best_score: float | None = None,
                    config: dict | None = None, rng: dict | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint of ``model`` (the weights valid.py and predict.py use) and the training
    state; ``extra`` adds fields (tensors and plain values only, see the module docstring)."""
    m = unwrap(model)
    atomic_torch_save({
        "format": FORMAT, "model_name": name_of(m), "model_kwargs": dict(m.kwargs), "model": m.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch, "step": step, "step_in_epoch": step_in_epoch, "best_score": best_score,
        "config": config, "rng": rng,
        "uncertainty_trained": spec_of(m).uncertainty and config is not None and losses_train_uncertainty(config),
        **(extra or {})}, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint (on CPU), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(_FORMAT1_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
        needs = _unsafe_globals(path)
        raise CheckpointError(
            f"{path}: refused: loading it would run code stored in the file ({', '.join(needs) or 'pickled objects'}); "
            f"checkpoints are read with torch.load(weights_only=True), which loads tensors and plain values only. "
            f"If you trust its source, re-save its tensors: torch.save(torch.load(path, weights_only=False)[...])."
        ) from None
    except Exception as e:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    return ckpt


def _unsafe_globals(path: Path) -> list[str]:
    """The names of the pickled globals a file needs beyond weights_only's (the file is only scanned)."""
    try:
        return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
    except Exception:  # an unusual layout: the refusal itself still stands
        return []


def _keys_fit(name: str, state: dict) -> bool:
    """``state`` (any layout ``name``'s spec converts) has exactly the keys of ``name`` at its defaults."""
    try:
        with torch.device("meta"):  # the key names only: no memory, no initialisation
            keys = build_model(name).state_dict().keys()
        return set(released_state(name, state)) == set(keys)
    except Exception:  # a model that cannot be built on the meta device: no hint from it
        return False


def _fitting_models(state: dict, but: str | None = None) -> list[str]:
    """The trainable models (other than ``but``) whose default key set ``state`` has."""
    return [n for n in TRAINABLE if n != but and _keys_fit(n, state)]


def _misfit(path, name: str, model: nn.Module, state: dict) -> CheckpointError:
    """The error for weights that do not load into ``model``: the first missing, unexpected and
    misshapen keys, and which model the keys do fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{len(keys)} {what}, first: {', '.join(keys[:3])}" for what, keys in
             (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("of another shape", shapes)) if keys]
    fits = _fitting_models(state, but=name)
    hint = f"; these keys are a {fits[0]}'s: use --model={fits[0]}" if fits else ""
    return CheckpointError(f"{path}: the weights do not fit {name}({dict(model.kwargs)}): {'; '.join(parts)}{hint}")


def load_initial_weights(net: nn.Module, path: str | os.PathLike, model_name: str, model_kwargs: dict) -> None:
    """Start ``net`` from the weights of checkpoint ``path`` (``train.py --checkpoint``). Parts of
    ``net`` that the checkpoint's model lacks are allowed when they start at nothing (the model's
    ``neutral_keys``, e.g. PIUnet's ``scale_cues`` from a checkpoint trained without them): they keep
    their initialisation.

    Raises:
        CheckpointError: naming ``path``: any other missing, unexpected or misshapen key.
    """
    init, _ = model_from_checkpoint(path, model_name, model_kwargs, expect=model_name)
    state = init.state_dict()
    keys = net.state_dict().keys()
    if (keys - state.keys()) - set(getattr(net, "neutral_keys", ())) or state.keys() - keys:
        raise _misfit(path, model_name, net, state)
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError:  # a key of another shape
        raise _misfit(path, model_name, net, state) from None


def is_foreign(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an authors' checkpoint in a format of their own rather than a torch file: a
    folder (a TensorFlow checkpoint as released) or a TensorFlow index (``ckpt-N.index``)."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".index"


def _released_model(path, model_name: str | None, kwargs: dict) -> nn.Module:
    """A model with the weights of an authors' checkpoint in their own format (``spec.read_released``)."""
    readers = [n for n in TRAINABLE if spec_of(n).read_released is not None]
    if model_name is None or spec_of(model_name).read_released is None:
        raise CheckpointError(f"{path}: an authors' checkpoint folder or TensorFlow index, which only "
                              f"{', '.join(readers)} can read; say which network it holds with "
                              f"{' or '.join('--model=' + n for n in readers)}")
    model = build_model(model_name, **kwargs)
    try:
        state = spec_of(model_name).read_released(path, **{k: v for k, v in model.kwargs.items() if k != "tile"})
    except (OSError, ValueError, KeyError) as e:  # a damaged, foreign or misshapen file: the reader names it
        raise CheckpointError(f"{path}: cannot read {model_name}'s released weights: {e}") from None
    model.load_state_dict(state, strict=True)
    return model.eval()


def model_from_checkpoint(path: str | os.PathLike, model_name: str | None = None,
                          model_kwargs: dict | None = None, expect: str | None = None) -> tuple[nn.Module, dict]:
    """``(model in eval mode, checkpoint dict)`` from one of our checkpoints or an authors' file.

    Our checkpoints carry the model name and arguments. For a bare state dict (the authors'
    releases, in any layout the model's spec converts), ``model_name`` and optionally
    ``model_kwargs`` (our argument names) say what to build. Returned bare files have
    ``ckpt["config"] = None``.

    Raises:
        CheckpointError: naming ``path``: not a checkpoint, a bare state dict without ``model_name``,
            or weights that do not fit (the first missing/unexpected keys, and the model they fit), or
            a model other than ``expect`` (when given).
    """
    if is_foreign(path):  # e.g. a TensorFlow checkpoint folder as its authors released it
        model = _released_model(path, model_name, model_kwargs or {})
        return model, {"model_name": model_name, "model_kwargs": dict(model.kwargs), "model": model.state_dict(),
                       "config": None}
    ckpt = load_checkpoint(path)
    if "model_name" in ckpt and "model" in ckpt:
        model = build_model(ckpt["model_name"], **ckpt.get("model_kwargs", {}))
        state = ckpt["model"]
    else:
        if model_name is None or not spec_of(model_name).trainable:
            fits = _fitting_models(ckpt)
            hint = f" (its keys are a {fits[0]}'s)" if fits else ""
            raise CheckpointError(f"{path}: a bare state dict{hint}; say which network it holds with "
                                  f"{' or '.join('--model=' + n for n in TRAINABLE)}")
        state = released_state(model_name, ckpt)
        model = build_model(model_name, **(model_kwargs or {}))
        ckpt = {"model_name": model_name, "model_kwargs": dict(model.kwargs), "model": state, "config": None}
    if expect is not None and ckpt["model_name"] != expect:  # the data would be prepared for the wrong model
        raise CheckpointError(f"{path}: holds a {ckpt['model_name']}, not a {expect}; drop --model (the "
                              f"checkpoint names its model) or use --model={ckpt['model_name']}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise _misfit(path, ckpt["model_name"], model, state) from None
    return model.eval(), ckpt


def _on_cuda(device: str) -> bool:
    """Whether ``--device=device`` is a CUDA GPU on this machine (fp16 autocast is CUDA's only)."""
    try:
        return resolve_device(device).type == "cuda"
    except RuntimeError:  # asked for CUDA where there is none: open_device says so later
        return False


def _fed_frames(cfg: Config) -> int:
    """The frames a full scene gives the model at evaluation: its authors' recipe's views where it has
    one (data.build_dataset feeds those), else ``n_frames``."""
    spec = spec_of(cfg.model)
    return spec.n_views if spec.views else cfg.n_frames


class EvalSetup(NamedTuple):
    """What valid.py and predict.py run: the config, the model (eval mode), the output folder, and
    the warning to give for an uncertainty output no loss trained ("" for none)."""

    cfg: Config
    model: nn.Module
    out: Path
    scale_warning: str = ""


def load_for_eval(command: CommandLine, default_out: str, checkpoint: str = "") -> EvalSetup:
    """Config (the checkpoint's, changed where the command line says so), the model, the output
    folder and the untrained-scale warning (:func:`untrained_scale_warning`).

    Used by valid.py and predict.py. ``checkpoint`` replaces the command line's ``--checkpoint``
    (predict.py's per-band checkpoints). ``default_out`` names the output folder placed in the
    checkpoint's run folder (or in ``results/`` for a model without weights, the ESA baseline).
    """
    cfg = command.config.replace(checkpoint=checkpoint or command.config.checkpoint)
    explicit_model = "model" in command.explicit
    if explicit_model and not spec_of(cfg.model).trainable:
        model = build_model(cfg.model)
        if spec_of(cfg.model).all_frames:  # e.g. the baseline averages the clearest of *all* frames
            cfg = cfg.replace(val_selection="all", val_batch_size=1)
        out = Path(cfg.out_dir) if cfg.out_dir else Path("results") / f"{cfg.model}-{default_out}"
        return EvalSetup(cfg, model, out)
    if not cfg.checkpoint:
        untrained = [n for n in MODELS if not spec_of(n).trainable]
        raise ConfigError(f"say what to run: --checkpoint=PATH (a training checkpoint or the authors' weights with "
                          f"--model={'|'.join(TRAINABLE)}) or {' or '.join('--model=' + n for n in untrained)}")
    model, ckpt = model_from_checkpoint(cfg.checkpoint, cfg.model if explicit_model else None,
                                        model_kwargs(cfg.model, cfg.model_args, _fed_frames(cfg)),
                                        expect=cfg.model if explicit_model else None)
    if ckpt.get("config"):
        # the training run's settings, less what only trained it (graphs, compile) or only fits its machine
        base = Config.from_dict(ckpt["config"]).replace(split="val", out_dir="", resume=False, device="auto",
                                                        cuda_graphs=False, compile=False)
        if base.amp == "fp16" and not _on_cuda(dict(command.overrides).get("device", "auto")):
            base = base.replace(amp="off")  # trained with fp16 on a GPU: evaluated in float32 here
        cfg = command.onto(base, checkpoint=cfg.checkpoint)
    try:
        check_amp(cfg.amp, torch.device("cuda" if _on_cuda(cfg.device) else "cpu"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        check_frames(model, _fed_frames(cfg))
    except ValueError as e:
        raise ConfigError(f"{cfg.checkpoint}: {e}") from None
    ckpt_path = Path(cfg.checkpoint)
    if not ckpt.get("config"):  # released weights: never write beside them (often a shared, read-only folder)
        out = Path("results") / f"{cfg.model}-{default_out}-{ckpt_path.stem}"
    else:
        out = RunFolder.of_checkpoint(ckpt_path).output(default_out, ckpt_path)
    return EvalSetup(cfg, model, Path(cfg.out_dir) if cfg.out_dir else out, untrained_scale_warning(ckpt))
