"""The checkpoint policy and the run's stopping conditions, in one object (after timm's
``CheckpointSaver``).

:class:`CheckpointKeeper` decides what is written where and when training stops:

- ``checkpoints/last.pt``: everything ``--resume`` needs, written after every epoch and when
  training stops early (:meth:`CheckpointKeeper.save_last`);
- ``checkpoints/best.pt``: written when the score of the scenes that choose beats the best so far
  (:meth:`CheckpointKeeper.consider`, by :func:`rank_value`);
- stopping: ``max_steps`` optimizer steps, ``max_minutes`` of wall clock, or Ctrl-C
  (:meth:`CheckpointKeeper.catch_interrupt`). Every process must stop at the same step, so the
  local conditions are summed over processes in the training step (:meth:`local_flags`,
  :meth:`agree`).

A rule about which checkpoint is kept, or when a run stops, goes here. The keeper never ends the
process: ``train.py`` reads :attr:`CheckpointKeeper.interrupted` and decides the exit status.

The keeper also knows what survives a write that cannot complete (a full disk, after days of
training): within :meth:`CheckpointKeeper.explain_write_errors`, a :class:`utils.files.WriteError`
says which ``last.pt`` is intact and how to continue. Before writing a checkpoint it checks that
the disk has room for one (the size of the previous one), so a full disk is reported before the
write starts.
"""
from __future__ import annotations

import errno
import math
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from utils.files import WriteError

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .layout import RunFolder

__all__ = ["CheckpointKeeper", "rank_value"]


def rank_value(summary: dict, metric: str = "score") -> float:
    """Lower is better: the Kelvin score (``metric="score"``; minus the cPSNR where norm.csv lacks the
    scenes), or minus the mean cPSNR (``metric="cpsnr"``), over all the bands of ``summary``."""
    s = summary["all"]
    return -s["cpsnr"] if metric == "cpsnr" or math.isnan(s["score"]) else s["score"]


def _size(n: int) -> str:
    """Bytes for people: ``"49 kB"``, ``"3.2 MB"``, ``"1.4 GB"``."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} kB"


class CheckpointKeeper:
    """Writes ``last.pt`` and ``best.pt`` of a run (rank 0 only) and says when training stops.

    Args:
        run: the run folder; checkpoints go to ``run/checkpoints``.
        max_steps: stop after this many optimizer steps (0: no limit).
        max_minutes: stop after this many minutes of training, counted from construction (0: none).
        main: whether this process writes (rank 0).
        metric: what ``best.pt`` is chosen on (:func:`rank_value`).
    """

    def __init__(self, run: Path, max_steps: int = 0, max_minutes: float = 0.0, main: bool = True,
                 metric: str = "score"):
        self.folder, self.metric = RunFolder(Path(run)), metric
        self.max_steps, self.max_minutes, self.main = max_steps, max_minutes, main
        self.started = time.monotonic()  # a resumed run gets a new time budget
        self.stop_requested = False  # Ctrl-C on this process
        self.interrupted = False  # Ctrl-C on some process (agreed on in the training step)
        self.time_up = False  # max_minutes passed on some process (agreed on in the training step)
        self.saved: tuple[int, int] | None = None  # (epoch, step) of the last.pt this process wrote

    @property
    def last(self) -> Path:
        return self.folder.last

    @property
    def best(self) -> Path:
        return self.folder.best

    # --- stopping ---------------------------------------------------------------------------------

    @contextmanager
    def catch_interrupt(self):
        """Within the block, a first Ctrl-C sets ``stop_requested`` (training stops after the current
        step, and ``last.pt`` is saved); a second one aborts at once."""
        def on_sigint(signum, frame):
            self.stop_requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)

    def local_flags(self) -> tuple[float, float]:
        """``(Ctrl-C asked here, max_minutes passed here)`` as 0/1, to be summed over processes."""
        minutes_up = self.max_minutes > 0 and time.monotonic() - self.started >= 60 * self.max_minutes
        return float(self.stop_requested), float(minutes_up)

    def agree(self, interrupted: bool, time_up: bool) -> None:
        """Take the flags summed over all processes, so every process stops at the same step."""
        self.interrupted, self.time_up = interrupted, time_up

    def should_stop(self, step: int) -> bool:
        """True once Ctrl-C was pressed, ``max_steps`` steps are done or ``max_minutes`` have passed."""
        return self.interrupted or self.time_up or (bool(self.max_steps) and step >= self.max_steps)

    # --- checkpoints ------------------------------------------------------------------------------

    def save_last(self, trainer) -> None:
        """Write ``last.pt``: the trainer's full state (:meth:`engine.trainer.Trainer.checkpoint`)."""
        if self.main:
            self._save(self.last, trainer)
            self.saved = (trainer.progress.epoch, trainer.progress.step)

    def consider(self, summary: dict, trainer) -> bool:
        """Keep ``best.pt`` when ``summary`` (of the scenes that choose) beats ``trainer.progress.best``;
        returns whether it did. The new best is recorded in the progress, which ``last.pt`` stores."""
        score = rank_value(summary, self.metric)
        if not score < trainer.progress.best:
            return False
        trainer.progress.best = score
        if self.main:
            self._save(self.best, trainer)
        return True

    def _save(self, path: Path, trainer) -> None:
        """Write a checkpoint to ``path`` once the disk has room for it: about the size of the
        previous ``last.pt`` or ``best.pt`` (the new file is written beside the old one, then
        renamed). Raises :class:`utils.files.WriteError` when it has not, or the write fails."""
        sizes = [p.stat().st_size for p in (path, self.last, self.best) if p.is_file()]
        if sizes:
            need = int(1.05 * max(sizes)) + 2**16  # a margin for metadata and a grown optimizer state
            free = shutil.disk_usage(path.parent).free
            if free < need:
                raise WriteError(path, f"{_size(free)} free on its disk, a checkpoint needs about {_size(need)}",
                                 f"the previous {path.name} is intact", errno.ENOSPC)
        save_checkpoint(path, **trainer.checkpoint())

    # --- writes that cannot complete -----------------------------------------------------------------

    def intact(self, code: int | None = errno.ENOSPC) -> str:
        """What a run stopped by a failed write (of errno ``code``) still has, and how to continue it."""
        fix = "free space and" if code in (errno.ENOSPC, errno.EDQUOT) else "once the folder can be written,"
        resume = f"python train.py --out_dir={self.folder.path} --resume"
        saved = self.saved
        if saved is None and self.last.is_file():
            try:  # a resumed run that has not saved yet: the checkpoint it started from
                ckpt = load_checkpoint(self.last)
                saved = (ckpt["epoch"], ckpt["step"])
            except (CheckpointError, KeyError):
                return f"{self.last} is as it was before this write: {fix} continue with {resume}"
        if saved is None:
            return f"no last.pt was written yet: {fix} start the run again"
        return f"the previous last.pt (epoch {saved[0]}, step {saved[1]}) is intact: {fix} continue with {resume}"

    @contextmanager
    def explain_write_errors(self):
        """Within the block, a :class:`utils.files.WriteError` (a checkpoint, ``config.json``, a
        panel, TensorBoard events) is raised again saying which ``last.pt`` survives and how to
        continue (:meth:`intact`). Other errors pass unchanged."""
        try:
            yield
        except WriteError as e:
            raise e.with_intact(self.intact(e.code)) from e
