"""Evaluation-time view recipes of three published PROBA-V MISR models, reproduced exactly.

Each model was scored by its authors on a fixed choice, order and scaling of the LR views; released
weights only reach their published scores when fed the same input. Pure NumPy (plus scikit-image's
masked phase correlation for TR-MISR); :func:`trmisr_postprocess` also accepts torch tensors.

HighRes-net (ServiceNow/HighRes-net) and MISR-GRU (rarefin/MISR-GRU), ``get_sr_and_score``:
    views sorted by clearance with ``np.argsort(clearance)[::-1]``, the first ``min_L`` kept (16 by
    default; their configs say 32 and 24), zero views with alpha 0 appended up to ``min_L``, frames as
    uint16/65535. No QM goes into the network; the median reference of the first 9 views is computed
    inside the network. The SR is clipped to [0, 1] before scoring.
3DWDSRNet (frandorr/3DWDSRNet), ``dataset/preprocessing.py``:
    every frame registered to the clearest (the most clear QM pixels) by masked phase correlation
    with the frame's own QM (for both images), an integer shift: the frame moved with reflection,
    its QM with zeros; frames more than 15% masked after registration dropped (a scene with none
    left keeps all, where the author skips it); the 7 least masked, clearest first, ties in file
    order, made up to 7 by random repeats (NumPy's legacy generator seeded 0 per scene). Frames as
    uint16/65535, no zero views; the network averages them for its mean-frame path.
TR-MISR (Suanmd/TR-MISR), ``src/val.py``:
    the 24 clearest views, clearest first (``heapq.nlargest``), each registered to the first by masked
    phase correlation (both QMs, overlap ratio 0.99) with an integer shift and zero fill, zero views
    with alpha 0 up to 24, frames as uint16/65535. The SR minus its minimum, clipped to [0, 16383/65535].

Clearance is the number of clear QM pixels of a frame; the authors sum the raw 0/255 QM values, a
constant multiple, so the order is the same.

:data:`RECIPES` names them for the registry (``models.ModelSpec.views``): ``sorted_padded``
(HighRes-net, MISR-GRU), ``registered_padded`` (TR-MISR) and ``registered_reflect`` (3DWDSRNet), each
with how its frames are moved (``fill``: what a shift brings in). A recipe's choice (frames and shifts)
is all the dataset caches; :func:`assemble_views` rebuilds the input from it.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage
from skimage.registration import phase_cross_correlation

# TR-MISR's output step belongs to the model (models.ModelSpec.postprocess); re-exported for the recipes' users
from models.trmisr import TRMISR_MAX
from models.trmisr import postprocess as trmisr_postprocess

__all__ = ["Views", "Recipe", "RECIPES", "order_by_clearance", "pad_views", "shift_zero_fill", "shift_reflect",
           "register_to_first", "assemble_views", "highresnet_views", "trmisr_views", "wdsr3d_views",
           "trmisr_postprocess", "TRMISR_MAX"]

_SMALL = 16  # NumPy's quicksort sorts runs of at most this many elements by insertion


class Views(NamedTuple):
    """A model's input for one scene.

    ``lrs``: float32 ``(n,h,w)`` in [0, 1] (uint16/65535; zero views at the end). ``qms``: bool
    ``(n,h,w)`` (False on zero views). ``alphas``: float32 ``(n,)``, 1 for a real view, 0 for padding.
    ``frames``: int64 ``(k,)``, the scene's frame indices in the order fed (``k <= n``).
    ``shifts``: int64 ``(k,2)``, the (row, col) shift applied to each fed frame (zeros unless registered).
    """

    lrs: np.ndarray
    qms: np.ndarray
    alphas: np.ndarray
    frames: np.ndarray
    shifts: np.ndarray


def _classic_argsort(values) -> np.ndarray:
    """``np.argsort(values)`` (kind 'quicksort') as NumPy computed it before its SIMD sorts.

    Since NumPy 1.26 (AVX-512) and 2.x (AVX2), 32/64-bit argsorts run x86-simd-sort, whose tie
    order differs by CPU and version; the authors' clearance (a uint64 sum) went through NumPy's
    introsort, which this replays: median-of-3 quicksort down to runs of <= 16, then insertion
    sort. The heapsort fallback is left out: its depth limit (2*log2 n) is never reached for the
    few dozen frames of a scene, so ``values`` longer than 256 are refused.
    """
    v = np.asarray(values).ravel().tolist()
    if len(v) > 256:
        raise ValueError(f"_classic_argsort is meant for a scene's frames, got {len(v)} values")
    idx = list(range(len(v)))
    stack, lo, hi = [], 0, len(v) - 1
    while True:
        while hi - lo > _SMALL - 1:
            mid = lo + ((hi - lo) >> 1)
            # median of three into idx[mid], then parked at hi - 1 as the pivot
            if v[idx[mid]] < v[idx[lo]]:
                idx[mid], idx[lo] = idx[lo], idx[mid]
            if v[idx[hi]] < v[idx[mid]]:
                idx[hi], idx[mid] = idx[mid], idx[hi]
            if v[idx[mid]] < v[idx[lo]]:
                idx[mid], idx[lo] = idx[lo], idx[mid]
            pivot = v[idx[mid]]
            i, j = lo, hi - 1
            idx[mid], idx[j] = idx[j], idx[mid]
            while True:
                i += 1
                while v[idx[i]] < pivot:
                    i += 1
                j -= 1
                while pivot < v[idx[j]]:
                    j -= 1
                if i >= j:
                    break
                idx[i], idx[j] = idx[j], idx[i]
            idx[i], idx[hi - 1] = idx[hi - 1], idx[i]
            # keep sorting the smaller side; the larger waits on the stack
            if i - lo < hi - i:
                stack.append((i + 1, hi))
                hi = i - 1
            else:
                stack.append((lo, i - 1))
                lo = i + 1
        for i in range(lo + 1, hi + 1):  # insertion sort: stable within the run
            k, key, j = idx[i], v[idx[i]], i
            while j > lo and key < v[idx[j - 1]]:
                idx[j] = idx[j - 1]
                j -= 1
            idx[j] = k
        if not stack:
            return np.asarray(idx, dtype=np.int64)
        lo, hi = stack.pop()


def order_by_clearance(qm: np.ndarray, ties: str = "argsort") -> np.ndarray:
    """Frame indices, clearest first, in one of the authors' exact orders.

    Args:
        qm: ``(T,h,w)`` quality maps (bool or 0/1 or 0/255; nonzero = clear), or ``(T,)`` clearance
            scores.
        ties: ``"argsort"`` (HighRes-net, MISR-GRU): ``np.argsort(clearance)[::-1]`` with NumPy's
            classic quicksort, whatever the installed NumPy does. Among equal clearances this is
            not a fixed rule: in a scene of at most 16 frames the later frame comes first (the sort
            is a stable insertion sort, then reversed); with more frames the partitioning decides.
            ``"nlargest"`` (TR-MISR): ``heapq.nlargest``, stable: the earlier frame comes first.

    Returns:
        int64 ``(T,)``, a permutation of ``range(T)``.
    """
    qm = np.asarray(qm)
    counts = qm if qm.ndim == 1 else (qm.reshape(len(qm), -1) != 0).sum(1)
    if ties == "argsort":
        return _classic_argsort(counts)[::-1].copy()
    if ties == "nlargest":
        return np.argsort(-counts.astype(np.int64), kind="stable")
    raise ValueError(f"ties must be 'argsort' or 'nlargest', got {ties!r}")


def pad_views(lr: np.ndarray, qm: np.ndarray, frames, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``n`` of ``frames``, scaled to [0, 1], then zero views (alpha 0) up to ``n``.

    Args:
        lr: ``(T,h,w)`` uint16 frames (scaled by 1/65535, in float64 then rounded to float32, as
            ``skimage.img_as_float``), or float frames already in [0, 1] (only cast to float32).
        qm: ``(T,h,w)`` masks, nonzero = clear.
        frames: indices into ``lr``, in the order to feed; those beyond ``n`` are dropped.
        n: number of views the model takes.

    Returns:
        ``lrs`` float32 ``(n,h,w)``, ``qms`` bool ``(n,h,w)``, ``alphas`` float32 ``(n,)``.
    """
    frames = np.asarray(frames, dtype=np.int64)[:n]
    k, (h, w) = len(frames), lr.shape[-2:]
    lrs = np.zeros((n, h, w), np.float32)
    qms = np.zeros((n, h, w), bool)
    alphas = np.zeros(n, np.float32)
    chosen = np.asarray(lr)[frames]
    if np.issubdtype(chosen.dtype, np.integer):
        chosen = chosen * (1.0 / 65535)  # float64, as img_as_float
    lrs[:k] = chosen
    qms[:k] = np.asarray(qm)[frames] != 0
    alphas[:k] = 1.0
    return lrs, qms, alphas


def shift_zero_fill(img: np.ndarray, shift) -> np.ndarray:
    """``img`` translated by an integer (row, col) ``shift`` on its last two axes, zeros shifted in.

    ``out[..., i, j] = img[..., i - dy, j - dx]`` (0 outside), which is what
    ``scipy.ndimage.shift(img, shift, mode='constant', cval=0)`` gives for integer shifts.
    """
    dy, dx = (int(s) for s in shift)
    out = np.zeros_like(img)
    h, w = img.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def shift_reflect(img: np.ndarray, shift) -> np.ndarray:
    """``img`` translated by an integer (row, col) ``shift`` on its last two axes, the edge mirrored in
    (``d c b a | a b c d``): ``scipy.ndimage.shift(img, shift, mode='reflect')``, at order 0 (exact
    for integer shifts, dtype kept), as :func:`data.registration.register_frames` moves frames."""
    img = np.asarray(img)
    return ndimage.shift(img, (0,) * (img.ndim - 2) + tuple(int(v) for v in shift), order=0, mode="reflect")


def register_to_first(lr: np.ndarray, qm: np.ndarray,
                      overlap_ratio: float = 0.99) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TR-MISR's registration: every frame moved onto frame 0 by an integer shift, zero fill.

    The shift is scikit-image's masked phase cross-correlation of frame ``i`` against frame 0, each
    with its own QM (only clear pixels are correlated), candidates restricted to overlaps of at least
    ``overlap_ratio`` of the largest one. With 0.99 on 128x128 frames this allows little more than
    one pixel along one axis. The masked method only gives whole pixels.

    Args:
        lr: ``(T,h,w)`` frames (any dtype; kept), frame 0 the reference.
        qm: ``(T,h,w)`` masks, nonzero = clear.

    Returns:
        ``lr_reg`` (dtype of ``lr``), ``qm_reg`` bool (pixels shifted in are not clear), both
        ``(T,h,w)``, and ``shifts`` int64 ``(T,2)`` (row, col), ``shifts[0] == (0, 0)``.
    """
    lr = np.asarray(lr)
    qm = np.asarray(qm) != 0
    lr_reg, qm_reg = lr.copy(), qm.copy()
    shifts = np.zeros((len(lr), 2), np.int64)
    for i in range(1, len(lr)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # empty overlaps; skimage zeroes them
            s = phase_cross_correlation(lr[0], lr[i], reference_mask=qm[0], moving_mask=qm[i],
                                        overlap_ratio=overlap_ratio)[0]
        shifts[i] = np.rint(s).astype(np.int64)
        lr_reg[i] = shift_zero_fill(lr[i], shifts[i])
        qm_reg[i] = shift_zero_fill(qm[i], shifts[i])
    return lr_reg, qm_reg, shifts


def assemble_views(lr: np.ndarray, qm: np.ndarray, frames, shifts, n: int, fill: str = "zeros") -> Views:
    """A recipe's input rebuilt from its choice: ``frames`` in order, each moved by its ``shifts``
    row (the frame with zeros or by reflection, ``fill``; the mask always with zeros: not clear),
    scaled to [0, 1], then zero views (alpha 0) up to ``n``.

    Args:
        lr: ``(T,h,w)`` uint16 frames (or floats in [0, 1]) of the scene; ``qm``: their masks.
        frames: ``(k,)`` indices, ``k <= n``; ``shifts``: ``(k,2)`` integer (row, col) shifts.
        n: number of views the model takes.
        fill: ``"zeros"`` or ``"reflect"``, what a shift brings into a frame.
    """
    move = {"zeros": shift_zero_fill, "reflect": shift_reflect}[fill]
    frames = np.asarray(frames, dtype=np.int64)
    shifts = np.asarray(shifts, dtype=np.int64).reshape(len(frames), 2)
    lr_sel, qm_sel = np.asarray(lr)[frames], np.asarray(qm)[frames] != 0
    for i in np.flatnonzero(shifts.any(1)):
        lr_sel[i], qm_sel[i] = move(lr_sel[i], shifts[i]), shift_zero_fill(qm_sel[i], shifts[i])
    lrs, qms, alphas = pad_views(lr_sel, qm_sel, np.arange(len(frames)), n)
    return Views(lrs, qms, alphas, frames, shifts)


def highresnet_views(lr: np.ndarray, qm: np.ndarray, n: int = 16) -> Views:
    """HighRes-net / MISR-GRU input: ``np.argsort`` clearance order, first ``n``, zero views to ``n``.

    ``n`` is ``min_L``: 16 in ``get_sr_and_score`` (and so in their submissions); HighRes-net's
    ``Model.evaluate`` passes its config's 32, MISR-GRU's config says 24. Only ``lrs`` and ``alphas``
    go into these networks.
    """
    frames = order_by_clearance(qm, ties="argsort")[:n]
    return assemble_views(lr, qm, frames, np.zeros((len(frames), 2), np.int64), n)


def trmisr_views(lr: np.ndarray, qm: np.ndarray, n: int = 24) -> Views:
    """TR-MISR input: ``n`` clearest frames (``heapq.nlargest``), registered to the first, zero views to ``n``.

    Only ``lrs`` and ``alphas`` go into the network (its ``val.py`` passes ``maps=None``).
    """
    frames = order_by_clearance(qm, ties="nlargest")[:n]
    _, _, shifts = register_to_first(np.asarray(lr)[frames], np.asarray(qm)[frames])
    return assemble_views(lr, qm, frames, shifts, n)


WDSR3D_MAX_MASKED = 0.15  # 3DWDSRNet drops frames with more masked pixels than this (after registration)


def wdsr3d_views(lr: np.ndarray, qm: np.ndarray, n: int = 7) -> Views:
    """3DWDSRNet input: every frame registered to the clearest, the dirty dropped, the ``n`` least
    masked (clearest first, stable), random repeats up to ``n`` (see the module docstring)."""
    lr, qm = np.asarray(lr), np.asarray(qm) != 0
    ref = int(np.argmax(qm.sum((1, 2))))
    shifts = np.zeros((len(lr), 2), np.int64)
    masked = np.zeros(len(lr), np.int64)
    for i in range(len(lr)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # the author's call: the frame's own mask for both images (moving_mask defaults to it)
            s = phase_cross_correlation(lr[ref], lr[i], reference_mask=qm[i])
        shifts[i] = np.rint(s[0] if isinstance(s, tuple) else s).astype(np.int64)
        masked[i] = np.count_nonzero(~shift_zero_fill(qm[i], shifts[i]))
    dirty = np.flatnonzero(masked / masked.dtype.type(qm[0].size) > WDSR3D_MAX_MASKED)
    # the author tests np.any(indices): frame 0 alone is never dropped; every frame dirty: keep all
    keep = np.ones(len(lr), bool)
    if np.any(dirty) and len(dirty) < len(lr):
        keep[dirty] = False
    kept = np.flatnonzero(keep)
    chosen = kept[np.argsort(masked[kept], kind="stable")][:n]
    rng = np.random.RandomState(0)  # the author's np.random, seeded per scene (the reference's convention)
    extra = [chosen[rng.randint(0, len(chosen))] for _ in range(n - len(chosen))]
    frames = np.concatenate([chosen, np.asarray(extra, np.int64)]).astype(np.int64)
    return assemble_views(lr, qm, frames, shifts[frames], n, fill="reflect")


class Recipe(NamedTuple):
    """An authors' view recipe: ``views(lr (T,h,w), qm (T,h,w), n) -> Views``, and what a shift
    brings into its frames when :func:`assemble_views` rebuilds them from the cached choice."""

    views: Callable[..., Views]
    fill: str = "zeros"


# The recipes by name (models.ModelSpec.views).
RECIPES = {"sorted_padded": Recipe(highresnet_views), "registered_padded": Recipe(trmisr_views),
           "registered_reflect": Recipe(wdsr3d_views, fill="reflect")}
