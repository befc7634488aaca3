"""The authors' own networks, run from a local checkout of their code, for benchmarks against it.

Nothing of theirs ships here: each ``authors_network(checkout)`` of a model module executes the
authors' source from the folder it is given (use a checkout you trust). This module holds what those
functions share:

* :func:`exec_source`: run one of their files as a module, found by path.
* :class:`ViewsForward`: their multi-view forward ``net(lrs, alphas, ...)`` behind ``forward(lr)``,
  every view real (alphas 1), as our benchmark calls a network.
* :class:`KerasNetwork`: a TensorFlow/Keras network with the function that lays our frames out as
  its inputs, for the benchmark's TensorFlow path (TensorFlow is imported by the caller, never here).
* :func:`legacy_keras`: Keras 2 (``tf_keras``) under the name ``keras``, which TensorFlow Addons
  imports from, so 2020-era TensorFlow code runs on a current TensorFlow.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

__all__ = ["exec_source", "read_json_section", "ViewsForward", "views_network", "KerasNetwork", "legacy_keras"]


def _authors_file(path: str | Path) -> Path:
    """``path`` as a Path; a missing file is a FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is the checkout the authors' repository?")
    return path


def exec_source(path: str | Path, name: str) -> types.ModuleType:
    """Execute the Python file ``path`` as module ``name`` (registered in ``sys.modules``, where
    pickling and ``torch.compile`` look modules up). A missing file is a FileNotFoundError naming it."""
    path = _authors_file(path)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def read_json_section(path: str | Path, key: str) -> dict:
    """The ``key`` section of the authors' JSON configuration file ``path``."""
    path = _authors_file(path)
    config = json.loads(path.read_text())
    if key not in config:
        raise ValueError(f"{path}: no {key!r} section")
    return config[key]


class ViewsForward(nn.Module):
    """``forward(lr (B,T,h,w)) -> net(lr, alphas, **extra(lr))`` with ``alphas (B,T)`` all ones (every
    view real). ``extra`` gives the keyword arguments a forward needs beyond the views (e.g. TR-MISR's
    patch side ``K``)."""

    def __init__(self, net: nn.Module, extra: Callable[[torch.Tensor], dict] | None = None):
        super().__init__()
        self.net, self._extra = net, extra

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        alphas = lr.new_ones(lr.shape[:2])
        return self.net(lr, alphas, **(self._extra(lr) if self._extra else {}))


def views_network(checkout: str | Path, source: str, class_name: str, config: str, module_name: str,
                  extra: Callable[[torch.Tensor], dict] | None = None) -> ViewsForward:
    """The authors' PyTorch class ``class_name`` of their file ``source``, built from the ``network``
    section of their JSON ``config`` (both relative to ``checkout``), behind :class:`ViewsForward`."""
    root = Path(checkout)
    mod = exec_source(root / source, module_name)
    return ViewsForward(getattr(mod, class_name)(read_json_section(root / config, "network")), extra)


@dataclass
class KerasNetwork:
    """A Keras network and the layout of its inputs.

    Attributes:
        model: the ``tf.keras.Model``.
        inputs: ``f(lr)`` with ``lr (B,T,h,w)`` float32 NumPy frames in [0,1] (tiles already cut where
            the authors' inference cuts them) -> the list of arrays the model is called on.
        infer: ``f(lr)`` with ``lr (1,T,128,128)`` -> the authors' full-scene SR by ``model``, their
            own inference (tiling, clipping) around their network.
    """

    model: Any
    inputs: Callable[[np.ndarray], list]
    infer: Callable[[np.ndarray], Any]


def legacy_keras() -> None:
    """Make ``import keras`` give Keras 2 (``tf_keras``, with its ``keras.src.engine``), as TensorFlow
    Addons (weight normalisation) expects; set ``TF_USE_LEGACY_KERAS=1`` before TensorFlow loads so
    that ``tf.keras`` is the same Keras 2. Needs ``pip install tensorflow-cpu tf-keras tensorflow-addons``."""
    try:
        tf_keras = importlib.import_module("tf_keras")
    except ImportError as e:
        raise ImportError("the authors' TensorFlow code needs Keras 2: pip install tf-keras tensorflow-addons") from e
    sys.modules["keras"] = tf_keras
    for sub in ("src", "src.engine", "src.engine.keras_tensor"):
        try:
            sys.modules[f"keras.{sub}"] = importlib.import_module(f"tf_keras.{sub}")
        except ImportError:
            pass
