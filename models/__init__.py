"""Model registry: every model maps frames in [0,1] (+ masks) to an SR image in [0,1].

``MODELS`` holds the two networks and the parameter-free ESA baseline. Each has
``super_resolve(lr (B,T,h,w) in [0,1], lr_mask (B,T,h,w) in {0,1}) -> dict`` with ``"sr"``
``(B,1,3h,3w)`` in [0,1] units and, for PIUnet, ``"log_scale"`` (the Laplace log-scale of the
uncertainty, in [0,1] units). Each stores its constructor arguments in ``.kwargs`` so a checkpoint
can rebuild it (:func:`build_model`).
"""
from __future__ import annotations

import inspect

import torch.nn as nn

from .baseline import ESABaseline, bicubic_upscale, esa_baseline
from .layers import set_channels_last
from .piunet import PIUnet
from .qanet import QANet

MODELS: dict[str, type[nn.Module]] = {"qanet": QANet, "piunet": PIUnet, "baseline": ESABaseline}

# the authors' hyper-parameter names -> ours
REFERENCE_NAMES = {
    "qanet": {"N_modules": "n_modules", "N_resblocks": "n_resblocks", "N_feats": "n_feats",
              "reduction": "reduction", "N_heads": "n_heads", "scale": "scale", "N_lrs": "n_frames",
              "rcab_bn": "rcab_bn"},
    "piunet": {"N_feat": "n_feats", "R_bneck": "r_bneck", "N_tefa": "n_tefa", "N_heads": "n_heads"},
}


def _check_name(name: str, known) -> None:
    if name not in known:
        raise KeyError(f"Unknown model {name!r}; known models: {', '.join(sorted(known))}")


def build_model(name: str, **kwargs) -> nn.Module:
    """A registered model by name, e.g. ``build_model("qanet", n_modules=2, n_feats=16)``.

    Unknown names and unknown keyword arguments are errors that list the valid choices.
    """
    _check_name(name, MODELS)
    cls = MODELS[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = sorted(set(kwargs) - set(params))
    if bad:
        raise TypeError(f"{name}: unknown argument(s) {', '.join(bad)}; valid: {', '.join(params)}")
    return cls(**kwargs)


def from_reference(name: str, state_dict: dict | None = None, config: dict | None = None) -> nn.Module:
    """Build QA-Net or PIUnet from the authors' configuration and (optionally) their weights.

    Args:
        name: ``"qanet"`` or ``"piunet"``.
        state_dict: a state dict in the authors' key layout (their released checkpoints), loaded
            strictly; None leaves the random initialisation.
        config: hyper-parameters in the authors' names (QA-Net: ``N_modules, N_resblocks, N_feats,
            reduction, N_heads, scale, N_lrs, rcab_bn``; PIUnet: ``N_feat, R_bneck, N_tefa,
            N_heads``); a missing key takes the authors' default.

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


__all__ = ["MODELS", "build_model", "from_reference", "set_channels_last", "QANet", "PIUnet", "ESABaseline",
           "esa_baseline",
           "bicubic_upscale", "REFERENCE_NAMES"]
