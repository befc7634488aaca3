"""Files written whole or not at all, one error for a write that cannot complete, and one run per folder.

- :func:`atomic_path`: write to a temporary file beside the target, then rename it; every write of
  the scripts (checkpoints, ``config.json``, CSVs, PNGs, the submission zip, the scene cache) goes
  through it. A write that fails for a reason of the machine (a full disk, a read-only folder)
  raises :class:`WriteError`, which names the path, the reason and what is still intact, and
  leaves no temporary file.
- :func:`sweep_temporaries`: removes the temporary files that a process killed mid-write
  (``kill -9``, a power cut) left behind.
- :func:`folder_lock`: an OS file lock on a run folder, so that two trainings never write into
  one folder; the kernel releases it when the process dies, however it dies.
- :class:`EventWriter`: TensorBoard's writer, whose failed writes raise :class:`WriteError` too.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

__all__ = ["WriteError", "FolderInUse", "atomic_path", "atomic_write_text", "write_error", "sweep_temporaries",
           "folder_lock", "LOCK_NAME", "EventWriter"]

LOCK_NAME = ".lock"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
# a temporary file of atomic_path: .<stem>.tmp.<host>.<pid><suffix>
_TEMPORARY = re.compile(r"^\..+\.tmp\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)(\.[A-Za-z0-9]+)?$")


class WriteError(OSError):
    """A file could not be written (no space left, a read-only folder, ...).

    ``str(e)`` is one line: the path, the reason, and what is still intact (e.g. "the previous
    last.pt (epoch 3, step 9) is intact: ..."). ``errno`` is the failed call's, when known.
    """

    def __init__(self, path: str | os.PathLike, reason: str, intact: str, code: int | None = None):
        super().__init__(f"cannot write {path}: {reason}; {intact}")
        self.path, self.reason, self.intact, self.code = Path(path), reason, intact, code

    def with_intact(self, intact: str) -> WriteError:
        """The same failure, saying ``intact`` about what survives (a caller that knows more)."""
        return WriteError(self.path, self.reason, intact, self.code)


class FolderInUse(RuntimeError):
    """Another process holds the lock of a folder (see :func:`folder_lock`)."""


def _reason(e: OSError) -> str:
    """``OSError(ENOSPC)`` -> ``"no space left on device"``."""
    text = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    return text[:1].lower() + text[1:]


def _within(name, *roots: Path) -> bool:
    """Whether the path ``name`` is one of ``roots`` or inside one of them."""
    p = Path(os.fsdecode(name))
    return any(p == r or r in p.parents for r in roots)


def write_error(e: OSError, path: Path, tmp: Path | None = None, intact: str = "") -> OSError:
    """``e`` as a :class:`WriteError` about ``path`` when it is a failure to write ``path`` (or its
    temporary ``tmp``, or the folders above it); any other error (e.g. reading an input inside the
    block) comes back unchanged. ``intact`` defaults to what :func:`atomic_path` guarantees."""
    roots = (path, tmp) if tmp is not None else (path,)
    if isinstance(e, WriteError):
        return WriteError(path, e.reason, intact or e.intact, e.code) if _within(e.path, *roots) else e
    names = [n for n in (e.filename, e.filename2) if n is not None]
    if e.errno is None or not all(_within(n, *roots) or _within(path, Path(os.fsdecode(n))) for n in names):
        return e
    if not intact:
        what = "folder" if tmp is not None and tmp.is_dir() else "file"
        intact = f"the previous {path.name} is intact" if path.exists() else f"no partial {what} was left"
    return WriteError(path, _reason(e), intact, e.errno)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same folder, same suffix) to write to; when the block
    ends without an error, rename it onto ``path`` (atomic on one filesystem: a reader sees the old
    file or the new one, never half of one). On an error or Ctrl-C the temporary file (or folder, if
    the block made one) is removed and the previous ``path``, if any, is left intact. The parent
    folder is created when missing.

    Raises:
        WriteError: writing ``path`` failed for a reason of the machine (an ``OSError`` with an
            errno, e.g. no space left on device, about ``path``, the temporary or their folders),
            saying whether a previous ``path`` is intact. Other errors pass unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.{_HOST}.{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        err = write_error(e, path, tmp)
        if err is e:
            raise
        raise err from e
    finally:
        _remove(tmp)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_path` (raises :class:`WriteError`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` in ``folder`` (not below it) whose writer,
    a process of this machine, is gone: what a process killed mid-write left. Another machine's
    (a shared cache on a network disk) and live writers' are kept. Returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMPORARY.match(name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            _remove(Path(folder) / name)
            removed.append(Path(folder) / name)
    return removed


def _holder(fd: int) -> str:
    """Who holds a lock file: "process PID" (and its machine, when another), from the file's text."""
    try:
        fields = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        fields = []
    if not fields or not fields[0].isdigit():
        return "another process"
    host = f" on {fields[1]}" if len(fields) > 1 and fields[1] != _HOST else ""
    return f"process {fields[0]}{host}"


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created when missing) for the block: an OS file lock
    (``flock``) on ``folder/.lock``, which holds the holder's PID. The kernel releases it when the
    process ends, even by ``kill -9``, so a lock is never stale. A folder the block created and left
    empty is removed again. Yields the lock file's path.

    Raises:
        FolderInUse: another process holds the lock; the message names it.
        WriteError: the lock file cannot be created (e.g. a read-only folder).
    """
    folder = Path(folder)
    lock = folder / LOCK_NAME
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError(lock, _reason(e), "nothing was written", e.errno) from e
    held = False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise FolderInUse(f"{folder} is in use by {_holder(fd)}, which holds {lock}: one run per folder; "
                                  f"wait for it to end (or stop it), or choose another --out_dir") from None
        held = True
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {_HOST}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, a refusal just cannot name us
            pass
        yield lock
    finally:
        if held and created:
            _remove_if_only_lock(folder)
        os.close(fd)


def _remove_if_only_lock(folder: Path) -> None:
    """Remove a folder that holds nothing but its lock file (a run that wrote nothing leaves no trace)."""
    try:
        if os.listdir(folder) == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            folder.rmdir()
    except OSError:
        pass


def _quiet_event_threads() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails: its error is
    raised again, as a :class:`WriteError`, by the :class:`EventWriter`'s next call."""
    import threading

    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "quiet_event_threads", False):
        return

    def hook(args):
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiet_event_threads = True
    threading.excepthook = hook


class EventWriter:
    """A TensorBoard ``SummaryWriter`` for ``folder`` whose failed writes raise :class:`WriteError`
    (naming the events file) in the calling thread, from any of its methods (``add_scalar``,
    ``add_image``, ``flush``, ``close``, ...). A context manager: it closes on leaving the block, and
    a failure to close after an error in the block leaves that error as the one raised."""

    def __init__(self, folder: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        _quiet_event_threads()
        self.folder = Path(folder)
        self._writer = None
        self._writer = self._call(SummaryWriter, str(folder))

    def _file(self) -> Path:
        """The events file (TensorBoard names it ``events.out.tfevents.<time>.<host>.<pid>.<n>``)."""
        try:
            return Path(self._writer.file_writer.event_writer._file_name)
        except AttributeError:  # failed while it was being made: this process's newest
            mine = sorted(self.folder.glob(f"events.out.tfevents.*.{os.getpid()}.*"), key=lambda p: p.stat().st_mtime)
            return mine[-1] if mine else self.folder / "events.out.tfevents.*"

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            if e.errno is None:  # e.g. "Writer is closed": a misuse, not the machine
                raise
            raise WriteError(self._file(), _reason(e), "the events written before it are intact", e.errno) from e

    def __getattr__(self, name: str):
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._call(attr, *args, **kwargs)

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except WriteError:
            if exc_type is None:
                raise
