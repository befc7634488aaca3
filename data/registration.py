"""Frame registration: align every LR frame of a scene to one reference frame by an integer shift.

PIUnet's authors align each frame and its quality map to the scene's clearest frame before
training, by a masked phase cross-correlation (only clear pixels take part) that gives an integer
LR-pixel translation; the frame is then shifted with reflected borders and its mask with zeros, so
pixels that came in from outside the frame count as not clear. We use scikit-image's
``phase_cross_correlation`` with ``reference_mask``/``moving_mask`` (the maintained successor of
the ``masked_register_translation`` they used) and SciPy's ``ndimage.shift``.

A frame that cannot be registered keeps its place (shift 0): a frame or reference with no clear
pixel, a flat frame (nothing to correlate), a result that is not finite, or a shift of more than a
quarter of the frame, which on PROBA-V (sub-pixel to few-pixel misalignments) can only be a false
peak. One warning per scene lists them.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage
from skimage.registration import phase_cross_correlation

__all__ = ["register_frames", "RegistrationWarning", "REGISTRATION_VERSION"]

# Part of the decode-cache key of registered scenes: change it whenever the method changes.
REGISTRATION_VERSION = "pcc-masked-int-v1"


class RegistrationWarning(UserWarning):
    """Some frames of a scene could not be registered and were kept as they are."""


def _estimate(ref: np.ndarray, ref_mask: np.ndarray, frame: np.ndarray, mask: np.ndarray,
              max_shift: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """``(shift (2,) int, "")`` that registers ``frame`` onto ``ref``, or ``(None, reason)``."""
    if not mask.any():
        return None, "no clear pixel"
    if np.ptp(frame[mask]) == 0:
        return None, "flat (constant over its clear pixels)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # divisions by empty overlaps; handled below
        try:
            shift = phase_cross_correlation(ref, frame, reference_mask=ref_mask, moving_mask=mask)[0]
        except (ValueError, FloatingPointError) as e:
            return None, f"correlation failed ({e})"
    shift = np.asarray(shift, dtype=np.float64)
    if not np.isfinite(shift).all():
        return None, "no correlation peak"
    shift = np.rint(shift).astype(np.int64)
    if abs(shift[0]) > max_shift[0] or abs(shift[1]) > max_shift[1]:
        return None, f"shift ({shift[0]}, {shift[1]}) exceeds a quarter of the frame"
    return shift, ""


def register_frames(lr: np.ndarray, qm: np.ndarray, reference: int | None = None,
                    name: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Align the frames of one scene to its reference frame by integer translations.

    Args:
        lr: ``(T,h,w)`` frames, uint16 (raw) or float (any units).
        qm: ``(T,h,w)`` bool quality maps, True = clear.
        reference: index of the frame to align to; default the clearest (first on ties).
        name: the scene, for the warning about frames that could not be registered.

    Returns:
        ``(lr_registered, qm_registered, shifts)``: the frames in the units and dtype of ``lr``
        (borders reflected), the masks (bool; pixels shifted in from outside are False), and
        ``shifts`` ``(T,2)`` int64, the ``(dy, dx)`` applied to each frame: a frame whose content
        moved by ``+d`` relative to the reference is moved back by ``-d``. Unregistrable frames
        keep shift ``(0, 0)`` and are listed in one :class:`RegistrationWarning`.
    """
    lr, qm = np.asarray(lr), np.asarray(qm, dtype=bool)
    if lr.ndim != 3 or qm.shape != lr.shape:
        raise ValueError(f"register_frames: lr and qm must both be (T,h,w); got {lr.shape} and {qm.shape}")
    T, h, w = lr.shape
    if reference is None:
        reference = int(np.argmax(qm.reshape(T, -1).mean(1)))
    if not 0 <= reference < T:
        raise ValueError(f"register_frames: reference {reference} out of range for {T} frames")
    ref = lr[reference].astype(np.float64)
    ref_ok, ref_reason = _estimate(ref, qm[reference], ref, qm[reference], (h // 4, w // 4))
    shifts = np.zeros((T, 2), np.int64)
    failed: list[str] = []
    out_lr, out_qm = lr.copy(), qm.copy()
    for t in range(T):
        if t == reference:
            continue
        if ref_ok is None:
            failed.append(f"{t} (reference frame {reference}: {ref_reason})")
            continue
        shift, reason = _estimate(ref, qm[reference], lr[t].astype(np.float64), qm[t], (h // 4, w // 4))
        if shift is None:
            failed.append(f"{t} ({reason})")
            continue
        shifts[t] = shift
        if shift.any():
            # integer shifts: order 0 copies pixels exactly and keeps the dtype
            out_lr[t] = ndimage.shift(lr[t], shift, order=0, mode="reflect")
            out_qm[t] = ndimage.shift(qm[t].astype(np.uint8), shift, order=0, mode="constant", cval=0) > 0
    if failed:
        where = f"{name}: " if name else ""
        warnings.warn(RegistrationWarning(f"{where}frames kept unregistered: {'; '.join(failed)}"), stacklevel=2)
    return out_lr, out_qm, shifts
