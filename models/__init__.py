"""Model registry: every model maps frames in [0,1] (+ masks) to an SR image in [0,1].

:data:`MODELS` is the one table of models. Each entry is a :class:`ModelSpec`: the class and what
the rest of the code must know about it (which frames it takes, in which order, whether it reads
the quality maps, whether its output carries an uncertainty, whether it can be trained, its
authors' hyper-parameter names). Nothing outside ``models/`` names a model; it asks the spec.

Every model has ``super_resolve(lr (B,T,h,w) in [0,1], lr_mask (B,T,h,w) in {0,1}, alphas (B,T) or
None) -> dict`` with ``"sr"`` ``(B,1,3h,3w)`` in [0,1] units and, where ``spec.uncertainty``,
``"log_scale"`` (the Laplace log-scale of the uncertainty, in [0,1] units). ``alphas`` says which
frames are real (1) and which are padding (0, zero frames); every sample carries them, and only the
models whose spec pads with zeros read them. :func:`build_model` records every constructor
argument of the model it builds in ``model.kwargs`` (defaults included), so a checkpoint can
rebuild it.

Adding a model: write ``models/<name>.py`` (the class, with explicit keyword arguments,
``has_uncertainty`` and ``super_resolve``) and add its :class:`ModelSpec` to :data:`MODELS` below;
config choices, training, evaluation and checkpoints follow from the spec.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from . import highresnet, misrgru, piunet, qanet, trmisr, wdsr3d
from .baseline import ESABaseline, bicubic_upscale, esa_baseline
from .highresnet import HighResNet
from .layers import request_channels_last
from .misrgru import MISRGRU
from .piunet import PIUnet
from .qanet import QANet
from .trmisr import TRMISR
from .wdsr3d import WDSR3D

FRAME_ORDER_CONTRACTS = ("set", "positional", "sequence")  # see ModelSpec.frame_order_contract


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs and gives, declared once.

    Attributes:
        cls: the ``nn.Module`` class; its constructor takes explicit keyword arguments.
        title: the model's name in print (e.g. ``QA-Net``).
        trainable: has weights to train (the ESA baseline has none: it is scored, never trained).
        frames_arg: the constructor argument that fixes the number of frames (QA-Net's BatchNorms
            keep one statistic per frame position), or None when any number works.
        frame_order_contract: what the order of the frames means to the model, one of
            :data:`FRAME_ORDER_CONTRACTS`: ``"set"``, the output does not depend on it (augmentation
            may shuffle the frames); ``"positional"``, it does, and the model is trained and scored on
            the one order ``frame_order`` gives (QA-Net's per-position BatchNorms); ``"sequence"``, the
            frames must stay in the order the data gives them (clearest first, padding last: a median
            anchor of the first 9, recurrent fusion). Augmentation and the self-ensemble keep the
            order of all but ``"set"`` models.
        uses_masks: reads the quality maps (``lr_mask``) as an input.
        all_frames: scored on every frame of a scene, one scene at a time (the baseline averages the
            clearest of *all* frames).
        reference_names: the authors' hyper-parameter names -> ours (for :func:`from_reference`), for
            authors whose configuration is one flat table.
        reference_kwargs: ``f(authors' nested config) -> our keyword arguments``, for authors whose
            configuration is nested (the ``network`` section of their ``config.json``), or None.
        convert_state: ``f(state dict) -> state dict`` mapping the authors' released key layouts to
            ours (e.g. an older layout of their code), applied to every bare state dict; or None.
        preset: the preset of ``config.py`` that holds the authors' training recipe ("" for none).
        authors_network: ``f(checkout folder)``, the authors' own network built at their default
            configuration from a local checkout of their code (benchmarks only): an ``nn.Module``
            called ``net(lr)`` (``net(lr, lr_mask)`` where ``uses_masks``), or a
            :class:`models.authors.KerasNetwork` for TensorFlow code; or None.
        padding: how a sample with fewer frames than the model takes is filled: ``"repeat"`` (the
            clearest frame again) or ``"zeros"`` (zero frames with alpha 0, which the model masks:
            its authors' collate function).
        views: the authors' evaluation input for full scenes, a recipe of ``data.views.RECIPES``
            (which frames in which order, registered or not, padded how), or "" to use the config's
            ``val_selection``.
        n_views: the number of views that recipe feeds.
        train_views: training samples are cut from the same recipe's views (with ``n_frames`` views)
            instead of ``train_selection``.
        postprocess: the authors' output step before scoring and submission, ``f(sr (B,1,H,W)) ->
            (B,1,H,W)`` in [0,1]; None: clip to [0,1].
        lr_scale: submodule name -> factor of the learning rate for its parameters (the authors'
            parameter groups); the rest trains at the learning rate.
        read_released: ``f(path, **model kwargs) -> state dict`` reading the authors' released weights
            in a format of their own (not a torch file: e.g. a TensorFlow checkpoint folder), or None.
        smoke_args: constructor arguments of a network of a few thousand parameters with every part
            of the model's code path, for quick checks (``python bench.py gpu-check``).
    """

    cls: type[nn.Module]
    title: str
    trainable: bool = True
    frames_arg: str | None = None
    frame_order_contract: str = "positional"
    uses_masks: bool = True
    all_frames: bool = False
    reference_names: dict = field(default_factory=dict)
    reference_kwargs: Callable[[dict], dict] | None = None
    convert_state: Callable[[dict], dict] | None = None
    preset: str = ""
    authors_network: Callable[[str], Any] | None = None
    padding: str = "repeat"
    views: str = ""
    n_views: int = 0
    train_views: bool = False
    postprocess: Callable | None = None
    lr_scale: dict = field(default_factory=dict)
    read_released: Callable[..., dict] | None = None
    smoke_args: dict = field(default_factory=dict)

    @property
    def uncertainty(self) -> bool:
        """``super_resolve`` also returns ``"log_scale"`` (the class says so: ``has_uncertainty``)."""
        return bool(self.cls.has_uncertainty)

    def __post_init__(self):
        if self.frame_order_contract not in FRAME_ORDER_CONTRACTS:
            raise ValueError(f"{self.title}: frame_order_contract={self.frame_order_contract!r}; choose from "
                             f"{', '.join(FRAME_ORDER_CONTRACTS)}")


MODELS: dict[str, ModelSpec] = {
    "qanet": ModelSpec(QANet, "QA-Net", frames_arg="n_frames", frame_order_contract="positional", uses_masks=True,
                       reference_names={"N_modules": "n_modules", "N_resblocks": "n_resblocks", "N_feats": "n_feats",
                                        "reduction": "reduction", "N_heads": "n_heads", "scale": "scale",
                                        "N_lrs": "n_frames", "rcab_bn": "rcab_bn"},
                       preset="qanet", authors_network=qanet.authors_network,
                       smoke_args=dict(n_modules=1, n_resblocks=1, n_feats=8, reduction=4)),
    # the masks enter only through skip="baseline" (the ESA baseline of the input frames)
    "piunet": ModelSpec(PIUnet, "PIUnet", frame_order_contract="set", uses_masks=False,
                        reference_names={"N_feat": "n_feats", "R_bneck": "r_bneck", "N_tefa": "n_tefa",
                                         "N_heads": "n_heads"},
                        preset="piunet", authors_network=piunet.authors_network,
                        smoke_args=dict(n_feats=8, n_tefa=1, r_bneck=4)),
    "baseline": ModelSpec(ESABaseline, "ESA baseline", trainable=False, frame_order_contract="set", all_frames=True),
    # HighRes-net and MISR-GRU: views sorted by clearance, zero views (alpha 0) up to 16 for scoring
    # (get_sr_and_score's min_L), the raw output clipped to [0,1]; no quality maps enter the networks
    "highresnet": ModelSpec(HighResNet, "HighRes-net", uses_masks=False,
                            reference_kwargs=highresnet.kwargs_from_reference, preset="highresnet", padding="zeros",
                            frame_order_contract="sequence", views="sorted_padded", n_views=16,
                            authors_network=highresnet.authors_network,
                            smoke_args=dict(n_feats=8, n_resblocks=1, deconv_channels=4)),
    "misrgru": ModelSpec(MISRGRU, "MISR-GRU", uses_masks=False, reference_kwargs=misrgru.kwargs_from_reference,
                         convert_state=misrgru.convert_released_state, preset="misrgru", padding="zeros",
                         frame_order_contract="sequence", views="sorted_padded", n_views=16,
                         authors_network=misrgru.authors_network,
                         smoke_args=dict(n_feats=8, n_resblocks=1, gru_channels=[8], gru_kernel_sizes=[3],
                                         deconv_channels=4)),
    # TR-MISR: the 24 clearest views registered to the first, for scoring and (as patches) for training;
    # its output minus its minimum, clipped to 14 bits; the transformer trains at half the learning rate
    "trmisr": ModelSpec(TRMISR, "TR-MISR", uses_masks=False,
                        reference_kwargs=trmisr.kwargs_from_reference, preset="trmisr", padding="zeros",
                        frame_order_contract="sequence", views="registered_padded", n_views=24, train_views=True,
                        postprocess=trmisr.postprocess, lr_scale={"superres": 0.5},
                        authors_network=trmisr.authors_network,
                        smoke_args=dict(n_feats=8, n_resblocks=1, depth=1, n_heads=2, mlp_dim=8)),
    # 3DWDSRNet: 7 frames registered to the clearest (moved with reflection), the least masked first,
    # repeated (not zero-padded) up to 7; its output clipped to [0, 65536] DN and rounded; its released
    # weights are TensorFlow checkpoints, read without TensorFlow
    "wdsr3d": ModelSpec(WDSR3D, "3DWDSRNet", frames_arg="n_frames", uses_masks=False, preset="wdsr3d",
                        views="registered_reflect", n_views=7, train_views=True, postprocess=wdsr3d.postprocess,
                        read_released=wdsr3d.read_released, authors_network=wdsr3d.authors_network,
                        smoke_args=dict(n_feats=8, n_resblocks=1, expansion=2)),
}

# the models built from their authors' configuration by from_reference (the ones with released weights)
REFERENCE_NAMES = {name: spec.reference_names for name, spec in MODELS.items()
                   if spec.reference_names or spec.reference_kwargs}
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
    signature = inspect.signature(cls.__init__)
    params = [p for p in signature.parameters if p != "self"]
    bad = sorted(set(kwargs) - set(params))
    if bad:
        raise TypeError(f"{name}: unknown argument(s) {', '.join(bad)}; valid: {', '.join(params)}")
    model = cls(**kwargs)
    bound = signature.bind_partial(**kwargs)
    bound.apply_defaults()
    # every constructor argument, defaults included: what a checkpoint stores to rebuild the model
    # (tuples as lists, as they come back from JSON)
    model.kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()}
    return model


def reference_kwargs(name: str, config: dict | None) -> dict:
    """Our keyword arguments of model ``name`` from its authors' configuration (missing keys: their
    defaults); unknown keys are a ``KeyError`` that names them."""
    _check_name(name, REFERENCE_NAMES)
    spec, config = MODELS[name], dict(config or {})
    if spec.reference_kwargs is not None:
        return spec.reference_kwargs(config)
    names = spec.reference_names
    bad = sorted(set(config) - set(names))
    if bad:
        raise KeyError(f"{name}: unknown reference hyper-parameter(s) {', '.join(bad)}; "
                       f"valid: {', '.join(names)}")
    return {names[k]: v for k, v in config.items()}


def released_state(name: str, state_dict: dict) -> dict:
    """A state dict of model ``name`` as its authors released it -> our key layout: unwrapped from a
    ``{"state_dict": ...}`` training checkpoint, then the spec's ``convert_state`` (if any)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]  # a training checkpoint wrapping the weights
    convert = spec_of(name).convert_state
    return convert(state_dict) if convert is not None else dict(state_dict)


def from_reference(name: str, state_dict: dict | None = None, config: dict | None = None) -> nn.Module:
    """Build a model from the authors' configuration and (optionally) their weights.

    Args:
        name: a model with released weights (a key of :data:`REFERENCE_NAMES`).
        state_dict: a state dict in the authors' key layout (their released checkpoints, in any
            layout ``spec.convert_state`` knows), loaded strictly; None leaves the random initialisation.
        config: the authors' hyper-parameters in their names. QA-Net: ``N_modules, N_resblocks,
            N_feats, reduction, N_heads, scale, N_lrs, rcab_bn``; PIUnet: ``N_feat, R_bneck, N_tefa,
            N_heads``; HighRes-net, MISR-GRU, TR-MISR: the nested ``network`` section of their
            ``config.json``. A missing key takes the authors' default.

    Returns:
        the model in eval mode. Its ``forward`` has the authors' signature and numerics.
    """
    model = build_model(name, **reference_kwargs(name, config))
    if state_dict is not None:
        model.load_state_dict(released_state(name, state_dict), strict=True)
    return model.eval()


__all__ = ["MODELS", "ModelSpec", "TRAINABLE", "name_of", "spec_of", "model_kwargs", "check_frames", "build_model",
           "from_reference", "reference_kwargs", "released_state", "request_channels_last", "QANet", "PIUnet",
           "ESABaseline", "HighResNet", "MISRGRU", "TRMISR", "WDSR3D", "esa_baseline", "bicubic_upscale",
           "REFERENCE_NAMES"]
