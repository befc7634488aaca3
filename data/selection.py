"""Which frames of a scene a sample uses, and in which order: three tables and :func:`select_frames`.

- :data:`SELECTIONS`: the frame selection strategies (``clearest``, ``weighted``, ``coverage``, ``all``);
- :data:`FRAME_ORDERS`: the order the selected frames are fed in (``selection``, ``shuffled``,
  ``clearest_first``);
- :data:`PADDINGS`: how a scene with fewer frames than asked is filled up (``repeat``, ``zeros``).

A new strategy or order is one function and one table entry; ``config.py`` takes its choices from
the tables' keys. Frames are indices into a scene's ``(T,h,w)`` stack; a frame's clearance is its
fraction of clear quality-map pixels, in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .io import SCALE

__all__ = ["Selection", "SELECTIONS", "FRAME_ORDERS", "PADDINGS", "select_frames", "clearest", "weighted",
           "coverage", "every_frame", "as_selected", "shuffled", "clearest_first"]


def clearest(qm: np.ndarray, k: int, c: np.ndarray, rng: np.random.Generator | None, sm: np.ndarray | None,
             beta: float, trials: int) -> np.ndarray:
    """The ``k`` clearest frames, clearest first (ties: the earlier frame first)."""
    return np.argsort(-c, kind="stable")[:k]


def weighted(qm: np.ndarray, k: int, c: np.ndarray, rng: np.random.Generator | None, sm: np.ndarray | None,
             beta: float, trials: int) -> np.ndarray:
    """``min(k, T)`` frames drawn without replacement with probability ``exp(beta * c / max c)``
    (QA-Net's training sampler)."""
    if rng is None:
        raise ValueError("select_frames: strategy 'weighted' needs an rng")
    T = qm.shape[0]
    cmax = c.max() if c.max() > 0 else 1.0
    logits = beta * (c / cmax - 1.0)  # shifted by the max: exp never overflows
    p = np.exp(logits)
    p /= p.sum()
    return rng.choice(T, size=min(k, T), replace=False, p=p)


def coverage(qm: np.ndarray, k: int, c: np.ndarray, rng: np.random.Generator | None, sm: np.ndarray | None,
             beta: float, trials: int) -> np.ndarray:
    """The ``k`` frames (sorted indices) that maximise the worst-case count of clear observations over
    the LR pixels whose HR footprint in ``sm`` ``(3h,3w)`` has a clear pixel: the sum of the 10
    smallest counts, best of ``trials`` draws (``rng``, seeded 0 if None) and the ``k`` clearest, as
    QA-Net's authors chose their val/test frames."""
    rng = rng if rng is not None else np.random.default_rng(0)
    T, h, w = qm.shape
    order = np.argsort(-c, kind="stable")
    if sm is None:
        keep = np.ones(h * w, bool)
    else:
        keep = sm.reshape(h, SCALE, w, SCALE).any((1, 3)).reshape(-1)
    q = qm.reshape(T, -1)[:, keep].astype(np.int32)  # (T, P)
    if T <= k or q.shape[1] == 0:
        return order[:k]
    cand = np.stack([order[:k]] + [rng.choice(T, size=k, replace=False) for _ in range(trials)])
    onehot = np.zeros((len(cand), T), np.int32)
    np.put_along_axis(onehot, cand, 1, axis=1)
    counts = onehot @ q  # (trials+1, P): clear observations per kept LR pixel
    m = min(10, counts.shape[1])
    worst = np.partition(counts, m - 1, axis=1)[:, :m].sum(1)
    # ties go to the larger total clearance, then to the earlier (clearest-first) candidate
    total = (onehot * c[None]).sum(1)
    best = np.lexsort((np.arange(len(cand)), -total, -worst))[0]
    return np.sort(cand[best])


def every_frame(qm: np.ndarray, k: int, c: np.ndarray, rng: np.random.Generator | None, sm: np.ndarray | None,
                beta: float, trials: int) -> np.ndarray:
    """Every frame, in index order (``k`` is ignored)."""
    return np.arange(qm.shape[0])


@dataclass(frozen=True)
class Selection:
    """One frame selection strategy and what the dataset must know of it."""

    # (qm (T,h,w) bool, k, clearance (T,) float64, rng, sm (3h,3w) bool or None, beta, trials)
    # -> at most k distinct frame indices; select_frames pads them
    pick: Callable[..., np.ndarray]
    per_sample: bool = False  # drawn anew for every sample; otherwise fixed per scene (the dataset keeps it)
    every_frame: bool = False  # takes every frame whatever k: never padded
    random_fill: bool = False  # among min_clearance candidates, fills up with random repeats (PIUnet's authors)


SELECTIONS: dict[str, Selection] = {
    "clearest": Selection(clearest, random_fill=True),
    "weighted": Selection(weighted, per_sample=True),
    "coverage": Selection(coverage),
    "all": Selection(every_frame, every_frame=True),
}


def select_frames(qm: np.ndarray, k: int, strategy: str, rng: np.random.Generator | None = None,
                  sm: np.ndarray | None = None, beta: float = 50.0, trials: int = 500,
                  clearance: np.ndarray | None = None, min_clearance: float = 0.0, pad: bool = True) -> np.ndarray:
    """Indices of ``k`` frames of a scene (repeats where it has fewer than ``k``, unless not ``pad``).

    Args:
        qm: ``(T,h,w)`` bool quality maps.
        k: frames wanted (``strategy="all"`` ignores it and returns every frame).
        strategy: a key of :data:`SELECTIONS`: ``"clearest"`` (:func:`clearest`), ``"weighted"``
            (:func:`weighted`; ``rng`` required), ``"coverage"`` (:func:`coverage`), ``"all"``.
            Padding repeats the clearest frame.
        rng: the draws of ``weighted`` and ``coverage`` and of the ``clearest`` padding below.
        sm: ``(3h,3w)`` HR status map for ``"coverage"`` (all clear if None).
        beta: the temperature of ``"weighted"``. trials: the draws of ``"coverage"``.
        clearance: ``(T,)`` per-frame clear fraction, computed from ``qm`` if None.
        min_clearance: when above 0, only frames whose clearance exceeds it are candidates
            (PIUnet's authors: 0.85), and the clearest frame alone when none does. ``"clearest"``
            then pads with candidates drawn at random (``rng``; seeded 0 if None), as the authors do.
        pad: fill up to ``k`` with repeated frames; False returns only the distinct frames chosen
            (fewer than ``k`` for a scene with fewer frames or candidates), for zero-frame padding.
    """
    if strategy not in SELECTIONS:
        raise ValueError(f"unknown frame selection {strategy!r}; choose from {', '.join(SELECTIONS)}")
    sel = SELECTIONS[strategy]
    c = qm.mean((1, 2)) if clearance is None else np.asarray(clearance, dtype=np.float64)
    order = np.argsort(-c, kind="stable")
    if min_clearance > 0:
        keep = np.flatnonzero(c > min_clearance)
        keep = keep if keep.size else order[:1]
        picked = keep[select_frames(qm[keep], k, strategy, rng, sm, beta, trials, c[keep],
                                    pad=pad and not sel.random_fill)]
        if sel.random_fill and pad and len(picked) < k:
            rng = rng if rng is not None else np.random.default_rng(0)
            picked = np.concatenate([picked, rng.choice(picked, size=k - len(picked))])
        return picked
    if sel.every_frame:
        return np.arange(qm.shape[0])
    idx = sel.pick(qm, k, c, rng, sm, beta, trials)
    if len(idx) < k and pad:
        idx = np.concatenate([idx, np.full(k - len(idx), order[0])])
    return np.asarray(idx)


def as_selected(idx: np.ndarray, clearance: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """The frames in the order :func:`select_frames` gives them."""
    return idx


def shuffled(idx: np.ndarray, clearance: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """A random order drawn from ``rng`` (QA-Net's authors shuffle in training and evaluation)."""
    return rng.permutation(idx)


def clearest_first(idx: np.ndarray, clearance: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """By decreasing clearance (``clearance`` ``(T,)`` of the whole scene; ties keep their order)."""
    return idx[np.argsort(-clearance[idx], kind="stable")]


# the order the selected frames are fed in: (indices (k,), the scene's clearance (T,), rng) -> indices (k,).
# One rule for training and evaluation matters to models whose output depends on the frame order.
FRAME_ORDERS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator | None], np.ndarray]] = {
    "selection": as_selected,
    "shuffled": shuffled,
    "clearest_first": clearest_first,
}

# how a scene with fewer frames (or min_clearance candidates) than asked is filled up: True where
# select_frames repeats frames (the clearest), False where the dataset appends zero frames (mask 0,
# alpha 0) after the real ones, for the models that mask them
PADDINGS: dict[str, bool] = {"repeat": True, "zeros": False}
