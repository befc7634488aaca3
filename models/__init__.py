"""Model registry: every model maps frames in [0,1] (+ masks) to an SR image in [0,1].

:data:`MODELS` is the one table of models. Each entry is a :class:`ModelSpec`: the class and what
the rest of the code must know about it (which frames it takes, in which order, whether it reads
the quality maps, whether its output carries an uncertainty, whether it can be trained, its
authors' hyper-parameter names). Nothing outside ``models/`` names a model; it asks the spec.

Every model has ``super_resolve(lr (B,T,h,w) in [0,1], lr_mask (B,T,h,w) in {0,1}) -> dict`` with
``"sr"`` ``(B,1,3h,3w)`` in [0,1] units and, where ``spec.uncertainty``, ``"log_scale"`` (the
Laplace log-scale of the uncertainty, in [0,1] units). Each stores its constructor arguments in
``.kwargs`` so a checkpoint can rebuild it (:func:`build_model`).

Adding a model: write ``models/<name>.py`` (the class, with ``kwargs``, ``has_uncertainty`` and
``super_resolve``) and add its :class:`ModelSpec` to :data:`MODELS` below; config choices, training,
evaluation and checkpoints follow from the spec.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from . import piunet, qanet
from .baseline import ESABaseline, bicubic_upscale, esa_baseline
from .layers import request_channels_last
from .piunet import PIUnet
from .qanet import QANet


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs and gives, declared once.

    Attributes:
        cls: the ``nn.Module`` class; its constructor takes explicit keyword arguments.
        title: the model's name in print (e.g. ``QA-Net``).
        trainable: has weights to train (the ESA baseline has none: it is scored, never trained).
        frames_arg: the constructor argument that fixes the number of frames (QA-Net's BatchNorms
            keep one statistic per frame position), or None when any number works.
        order_invariant: the output does not depend on the order of the frames.
        uses_masks: reads the quality maps (``lr_mask``) as an input.
        all_frames: scored on every frame of a scene, one scene at a time (the baseline averages the
            clearest of *all* frames).
        input_scaling: how the frames in [0,1] are scaled before the network (documentation).
        reference_names: the authors' hyper-parameter names -> ours (for :func:`from_reference`).
        preset: the preset of ``config.py`` that holds the authors' training recipe ("" for none).
        authors_network: ``f(checkout folder) -> nn.Module``, the authors' own network class built at
            their default configuration from a local checkout of their code (benchmarks only), or None.
    """

    cls: type[nn.Module]
    title: str
    trainable: bool = True
    frames_arg: str | None = None
    order_invariant: bool = False
    uses_masks: bool = True
    all_frames: bool = False
    input_scaling: str = "[0,1] (raw uint16 / 65535)"
    reference_names: dict = field(default_factory=dict)
    preset: str = ""
    authors_network: Callable[[str], nn.Module] | None = None

    @property
    def uncertainty(self) -> bool:
        """``super_resolve`` also returns ``"log_scale"`` (the class says so: ``has_uncertainty``)."""
        return bool(self.cls.has_uncertainty)


MODELS: dict[str, ModelSpec] = {
    "qanet": ModelSpec(QANet, "QA-Net", frames_arg="n_frames", order_invariant=False, uses_masks=True,
                       reference_names={"N_modules": "n_modules", "N_resblocks": "n_resblocks", "N_feats": "n_feats",
                                        "reduction": "reduction", "N_heads": "n_heads", "scale": "scale",
                                        "N_lrs": "n_frames", "rcab_bn": "rcab_bn"},
                       preset="qanet", authors_network=qanet.authors_network),
    # the masks enter only through skip="baseline" (the ESA baseline of the input frames)
    "piunet": ModelSpec(PIUnet, "PIUnet", order_invariant=True, uses_masks=False,
                        input_scaling="standardised inside super_resolve: (raw - 7433.6436) / 2353.0723",
                        reference_names={"N_feat": "n_feats", "R_bneck": "r_bneck", "N_tefa": "n_tefa",
                                         "N_heads": "n_heads"},
                        preset="piunet", authors_network=piunet.authors_network),
    "baseline": ModelSpec(ESABaseline, "ESA baseline", trainable=False, order_invariant=True, all_frames=True),
}

# the authors' hyper-parameter names -> ours, for the models that have released weights
REFERENCE_NAMES = {name: spec.reference_names for name, spec in MODELS.items() if spec.reference_names}
TRAINABLE = tuple(name for name, spec in MODELS.items() if spec.trainable)


def _check_name(name: str, known) -> None:
    if name not in known:
        raise KeyError(f"Unknown model {name!r}; known models: {', '.join(sorted(known))}")


def name_of(model: nn.Module) -> str:
    """The registry name of a built model (of its exact class)."""
    for name, spec in MODELS.items():
        if type(model) is spec.cls:
            return name
    raise KeyError(f"{type(model).__name__} is not a registered model; known models: {', '.join(sorted(MODELS))}")


def spec_of(model_or_name: nn.Module | str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered model name or of a built model."""
    name = model_or_name if isinstance(model_or_name, str) else name_of(model_or_name)
    _check_name(name, MODELS)
    return MODELS[name]


def model_kwargs(name: str, model_args: dict, n_frames: int) -> dict:
    """The constructor arguments of model ``name`` for a run that feeds it ``n_frames`` frames:
    ``model_args``, plus the frame count where the model fixes it (``spec.frames_arg``).

    Raises:
        ValueError: ``model_args`` sets the frame count to something other than ``n_frames``.
    """
    spec = spec_of(name)
    kwargs = dict(model_args)
    if spec.frames_arg is not None:
        given = kwargs.setdefault(spec.frames_arg, n_frames)
        if given != n_frames:
            raise ValueError(f"{name}: model_args {spec.frames_arg}={given} but the data gives n_frames={n_frames} "
                             f"frames; set one of them (--n_frames sets both)")
    return kwargs


def check_frames(model: nn.Module, n_frames: int) -> None:
    """Raise ValueError when ``model`` was built for another number of frames than ``n_frames``."""
    arg = spec_of(model).frames_arg
    if arg is not None and model.kwargs.get(arg, n_frames) != n_frames:
        raise ValueError(f"{name_of(model)} was built for {arg}={model.kwargs[arg]} frames, "
                         f"but n_frames={n_frames}; use --n_frames={model.kwargs[arg]}")


def build_model(name: str, **kwargs) -> nn.Module:
    """A registered model by name, e.g. ``build_model("qanet", n_modules=2, n_feats=16)``.

    Unknown names and unknown keyword arguments are errors that list the valid choices.
    """
    cls = spec_of(name).cls
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = sorted(set(kwargs) - set(params))
    if bad:
        raise TypeError(f"{name}: unknown argument(s) {', '.join(bad)}; valid: {', '.join(params)}")
    return cls(**kwargs)


def from_reference(name: str, state_dict: dict | None = None, config: dict | None = None) -> nn.Module:
    """Build a model from the authors' configuration and (optionally) their weights.

    Args:
        name: a model with released weights (a key of :data:`REFERENCE_NAMES`).
        state_dict: a state dict in the authors' key layout (their released checkpoints), loaded
            strictly; None leaves the random initialisation.
        config: hyper-parameters in the authors' names (QA-Net: ``N_modules, N_resblocks,
            N_feats, reduction, N_heads, scale, N_lrs, rcab_bn``; PIUnet: ``N_feat, R_bneck,
            N_tefa, N_heads``); a missing key takes the authors' default.

    Returns:
        the model in eval mode. Its ``forward`` has the authors' signature and numerics.
    """
    _check_name(name, REFERENCE_NAMES)
    names = REFERENCE_NAMES[name]
    config = dict(config or {})
    bad = sorted(set(config) - set(names))
    if bad:
        raise KeyError(f"{name}: unknown reference hyper-parameter(s) {', '.join(bad)}; "
                       f"valid: {', '.join(names)}")
    model = build_model(name, **{names[k]: v for k, v in config.items()})
    if state_dict is not None:
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
            state_dict = state_dict["state_dict"]  # a training checkpoint wrapping the weights
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


__all__ = ["MODELS", "ModelSpec", "TRAINABLE", "name_of", "spec_of", "model_kwargs", "check_frames", "build_model",
           "from_reference", "request_channels_last", "QANet", "PIUnet", "ESABaseline",
           "esa_baseline", "bicubic_upscale", "REFERENCE_NAMES"]
