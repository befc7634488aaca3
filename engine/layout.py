"""The layout of a run folder, defined once::

    results/<run>/config.json            the resolved config of the run
                  checkpoints/last.pt    every epoch (and on Ctrl-C, max_steps, max_minutes)
                  checkpoints/best.pt    the best validation so far (engine.keeper)
                  images/                comparison panels of the validations
                  events.out.tfevents.*  TensorBoard
                  <valid|predict>-<checkpoint stem>/   what valid.py and predict.py write for a checkpoint
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunFolder"]


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (nothing is created here)."""

    path: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunFolder:
        """The run a checkpoint belongs to: the folder above ``checkpoints/``, or the checkpoint's own
        folder for a file kept elsewhere."""
        parent = Path(checkpoint).parent
        return cls(parent.parent if parent.name == "checkpoints" else parent)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def images(self) -> Path:
        return self.path / "images"

    def output(self, script: str, checkpoint: str | Path) -> Path:
        """Where ``script`` (``valid``, ``predict``) writes what it made of ``checkpoint``."""
        return self.path / f"{script}-{Path(checkpoint).stem}"
