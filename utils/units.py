"""The dataset's units, defined once.

PROBA-V frames and targets are 16-bit integers (DN, digital numbers; 14 bits are used). The code
works in three units:

- DN: the raw values, 0-65535 (the files, the submission);
- [0,1] units: ``DN / FULL_SCALE`` (every model's input and output, the metrics, the losses);
- standardised units: ``(DN - RAW_MEAN) / RAW_STD``, the statistics of the dataset's raw frames
  that PIUnet's authors standardise with (PIUnet, QA-Net with ``standardize``, 3DWDSRNet).

One step of a standardised unit is :data:`STD_UNIT` in [0,1] units.
"""
from __future__ import annotations

FULL_SCALE = 65535.0  # [0,1] units are DN / FULL_SCALE
RAW_MEAN = 7433.6436  # PIUnet's authors' standardisation of raw uint16 PROBA-V values
RAW_STD = 2353.0723
STD_UNIT = RAW_STD / FULL_SCALE  # one standardised unit in [0,1] units

__all__ = ["FULL_SCALE", "RAW_MEAN", "RAW_STD", "STD_UNIT", "standardize", "destandardize"]


def standardize(x01):
    """Frames in [0,1] units -> standardised units ``(DN - RAW_MEAN) / RAW_STD`` (tensor or array)."""
    return (x01 * FULL_SCALE - RAW_MEAN) / RAW_STD


def destandardize(x):
    """Standardised units -> [0,1] units (tensor or array)."""
    return (x * RAW_STD + RAW_MEAN) / FULL_SCALE
