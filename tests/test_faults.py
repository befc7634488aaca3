"""Faults of the machine around a run: damaged caches, full disks, killed writers, two runs in one folder.

A full disk is simulated in two ways: in this process, :class:`FullDisk` makes the Python-level
writes under a folder (every writer here: torch.save through a Python file, PIL, NumPy, zipfile,
csv, TensorBoard) fail with ``OSError(ENOSPC)``; where the platform lets an unprivileged user
mount a small filesystem (a private mount namespace), the scripts run on a real one that fills up.
After each fault, a run that continues gives the weights or scores of a run that never saw it.
"""
from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import predict
import train
import valid
from conftest import ROOT, TINY_QANET, assert_same_state, common_args
from data import CacheWarning, DatasetOptions, ProbaVDataset, load_scene_cached, split_scenes
from engine.checkpoint import load_checkpoint
from utils.files import FolderInUse, WriteError, folder_lock

TEMPORARY = re.compile(r"^\..*\.tmp\.")  # the temporary files of utils.files.atomic_path


def _temporaries(*folders: Path) -> list[str]:
    return [n for f in folders if f.is_dir() for n in os.listdir(f) if TEMPORARY.match(n)]


class _FillingFile:
    """A file whose writes draw on a :class:`FullDisk`'s free bytes. ``fileno`` is refused so that
    writers that would write through the descriptor (PIL) write through ``write``."""

    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        if len(data) > self._disk.free:
            self._disk.free = 0
            raise OSError(self._disk.code, os.strerror(self._disk.code))
        self._disk.free -= len(data)
        return self._f.write(data)

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FullDisk:
    """Files opened for writing under ``folder`` (whose names match ``names``) get ``free`` bytes
    in all; a write beyond them fails with ``OSError(code)`` (ENOSPC: a full disk)."""

    def __init__(self, monkeypatch, folder: Path, free: int = 0, names: str = "*", code: int = errno.ENOSPC):
        self.folder, self.free, self.names, self.code = folder.resolve(), free, names, code
        self.on, self.opened = True, 0  # files opened for writing there
        real = io.open

        def fake_open(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            if self.on and isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
                p = Path(os.fsdecode(file)).resolve()
                if self.folder in p.parents and fnmatch.fnmatch(p.name, self.names):
                    self.opened += 1
                    return _FillingFile(f, self)
            return f

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)


# --- the scene cache --------------------------------------------------------------------------------


def _rewrite(entry: Path, **change) -> None:
    """Rewrite a cache entry with some arrays changed (None: left out)."""
    with np.load(entry) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(change)
    np.savez(entry, **{k: v for k, v in arrays.items() if v is not None})


DAMAGE = {
    "cut short": lambda e: e.write_bytes(e.read_bytes()[: e.stat().st_size // 2]),
    "empty": lambda e: e.write_bytes(b""),
    "garbage": lambda e: e.write_bytes(np.random.default_rng(0).bytes(5000)),
    "garbage zip": lambda e: e.write_bytes(b"PK\x03\x04" + bytes(5000)),
    "wrong arrays": lambda e: _rewrite(e, lr=np.zeros((2, 3), np.float32)),
    "a missing array": lambda e: _rewrite(e, clearance=None),
    "another version": lambda e: _rewrite(e, version=np.array(99)),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_unreadable_cache_entry_is_rebuilt_with_one_warning(synthetic_root, tmp_path, damage):
    scene = split_scenes(synthetic_root, "test", "NIR")[0]
    cache = tmp_path / "cache"
    load_scene_cached(scene, cache)
    (entry,) = cache.iterdir()
    DAMAGE[damage](entry)
    with pytest.warns(CacheWarning) as caught:
        got = load_scene_cached(scene, cache)
    assert len(caught) == 1 and f"scene cache entry {entry} is unreadable" in str(caught[0].message)
    want = load_scene_cached(scene, None)
    for k in ("lr", "qm", "clearance", "sm"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healed: read back without a word
        again = load_scene_cached(scene, cache)
    np.testing.assert_array_equal(again["lr"], want["lr"])
    assert os.listdir(cache) == [entry.name]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["no space", "read-only"])
def test_a_cache_that_cannot_be_written_warns_once_and_the_run_goes_on(synthetic_root, tmp_path, monkeypatch,
                                                                        code):
    cache = tmp_path / "cache"
    disk = FullDisk(monkeypatch, cache, free=0, code=code)
    with pytest.warns(CacheWarning) as caught:
        ds = ProbaVDataset(synthetic_root, "val", DatasetOptions(cache_dir=cache, progress=False))
    assert len(caught) == 1 and disk.opened == 1  # one warning, and no further attempt
    reason = os.strerror(code).lower()
    assert str(caught[0].message) == (f"cannot write the scene cache in {cache} ({reason}): going on without it "
                                      f"(scenes are decoded from their PNGs)")
    assert os.listdir(cache) == []  # no temporary file
    plain = ProbaVDataset(synthetic_root, "val", DatasetOptions(cache_dir=None, progress=False))
    assert ds.keys == plain.keys
    for a, b in zip(ds.scenes, plain.scenes, strict=True):
        np.testing.assert_array_equal(a["lr"], b["lr"])


_WRITER = """
import sys, time
from utils.files import atomic_path
with atomic_path(sys.argv[1]) as tmp, open(tmp, "wb") as f:
    f.write(b"PK\\x03\\x04" + bytes(100000))
    f.flush()
    print(tmp, flush=True)
    time.sleep(120)
"""


def _kill_9_while_writing(path: Path) -> Path:
    """Start writing ``path`` the way the code does (atomic_path) in another process and kill -9 it
    midway; returns the temporary file the kill leaves behind."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and tmp.is_file()
    return tmp


def test_valid_heals_a_cut_cache_and_a_killed_cache_write_and_scores_the_same(synthetic_root, tmp_path):
    cache = tmp_path / "cache"
    args = ["--model=baseline", f"--data_dir={synthetic_root}", f"--cache_dir={cache}", "--device=cpu"]
    before = valid.main(args + [f"--out_dir={tmp_path / 'a'}"])
    entries = sorted(cache.iterdir())
    for e in entries[1:]:  # a copy gone wrong: every entry but one cut short
        e.write_bytes(e.read_bytes()[:1000])
    entries[0].unlink()  # and one killed while it was being written
    left = _kill_9_while_writing(entries[0])
    with pytest.warns(CacheWarning) as caught:
        after = valid.main(args + [f"--out_dir={tmp_path / 'b'}"])
    assert sorted(str(w.message).split()[3] for w in caught) == [str(e) for e in entries[1:]]
    assert after == before
    assert not left.exists() and sorted(cache.iterdir()) == entries
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # healed: read back without a word
        ProbaVDataset(synthetic_root, "val", DatasetOptions(cache_dir=cache, progress=False))


# --- checkpoints and the other writes of a training run ----------------------------------------------


def _args(root: Path, tmp: Path) -> list[str]:
    # 3 training steps per epoch, validation after every epoch
    return common_args(root, tmp) + TINY_QANET + ["--val_selection=clearest"]  # a fast validation


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory) -> dict:
    """``args`` (the scene cache shared), ``started`` (a run of one epoch, 3 steps, to be continued
    to two) and ``reference`` (``last.pt`` of a run of two epochs that saw no fault)."""
    tmp = tmp_path_factory.mktemp("runs")
    args = _args(synthetic_root, tmp)
    started = train.main(args + [f"--out_dir={tmp / 'started'}", "--epochs=1"])
    reference = train.main(args + [f"--out_dir={tmp / 'reference'}", "--epochs=2"]) / "checkpoints" / "last.pt"
    return {"args": args, "started": started, "reference": reference}


def _started(runs: dict, tmp: Path) -> tuple[Path, bytes]:
    """A copy of the started run, and the bytes of its ``last.pt``."""
    run = Path(shutil.copytree(runs["started"], tmp / "run"))
    return run, (run / "checkpoints" / "last.pt").read_bytes()


def _continue_and_compare(runs: dict, run: Path) -> None:
    train.main(runs["args"] + [f"--out_dir={run}", "--resume", "--epochs=2"])
    assert_same_state(runs["reference"], run / "checkpoints" / "last.pt")
    assert not _temporaries(run, run / "checkpoints", run / "images")


def _intact(run: Path) -> str:
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    return (f"the previous last.pt (epoch {ckpt['epoch']}, step {ckpt['step']}) is intact: free space and continue "
            f"with python train.py --out_dir={run} --resume")


@pytest.mark.parametrize("target", ["last.pt", "best.pt", "config.json", "TensorBoard events", "a panel"])
def test_a_full_disk_during_training_ends_the_run_saying_what_is_intact(runs, tmp_path, monkeypatch, target):
    run, saved = _started(runs, tmp_path)
    folder, names = {"last.pt": (run / "checkpoints", ".last.*"), "best.pt": (run / "checkpoints", ".best.*"),
                     "config.json": (run, ".config.*"), "TensorBoard events": (run, "events.out.tfevents.*"),
                     "a panel": (run / "images", "*.png")}[target]
    disk = FullDisk(monkeypatch, folder, free=0, names=names)
    with pytest.raises(WriteError) as e:
        train.main(runs["args"] + [f"--out_dir={run}", "--resume", "--epochs=2"])
    message = str(e.value)
    assert re.fullmatch(rf"cannot write {re.escape(str(folder))}/[^ ]+: no space left on device; "
                        + re.escape(_intact(run)), message), message
    if target in ("last.pt", "best.pt", "config.json"):
        assert message.startswith(f"cannot write {folder / target}:")
    assert (run / "checkpoints" / "last.pt").read_bytes() == saved
    assert not _temporaries(run, run / "checkpoints", run / "images")
    if target == "last.pt":  # after days of training: space freed, the run continues as if nothing happened
        disk.on = False
        _continue_and_compare(runs, run)


def test_training_checks_for_room_before_writing_a_checkpoint(runs, tmp_path, monkeypatch):
    run, saved = _started(runs, tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=50_000))
    # the next checkpoint written is best.pt (epoch 2 scores better) or last.pt
    with pytest.raises(WriteError, match=r"(best|last).pt: 49 kB free on its disk, a checkpoint needs about \d+ kB; "
                                         + re.escape(_intact(run))):
        train.main(runs["args"] + [f"--out_dir={run}", "--resume", "--epochs=2"])
    assert (run / "checkpoints" / "last.pt").read_bytes() == saved and not _temporaries(run / "checkpoints")


def test_a_full_disk_before_the_first_checkpoint_says_to_start_again(runs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    FullDisk(monkeypatch, run, free=0, names=".config.*")
    with pytest.raises(WriteError) as e:
        train.main(runs["args"] + [f"--out_dir={run}", "--epochs=1"])
    assert str(e.value) == (f"cannot write {run / 'config.json'}: no space left on device; "
                            f"no last.pt was written yet: free space and start the run again")
    assert not run.exists()  # the folder held nothing but its lock: removed again


def test_kill_9_while_last_pt_is_written_then_resume_is_exact(runs, tmp_path):
    run, saved = _started(runs, tmp_path)
    left = _kill_9_while_writing(run / "checkpoints" / "last.pt")
    assert (run / "checkpoints" / "last.pt").read_bytes() == saved  # the kill left it whole, and a temporary file
    _continue_and_compare(runs, run)
    assert not left.exists()


# --- valid.py and predict.py ---------------------------------------------------------------------------


def test_valid_and_predict_report_a_full_disk_and_leave_nothing_half_written(synthetic_root, tmp_path, monkeypatch):
    common = ["--model=baseline", f"--data_dir={synthetic_root}", f"--cache_dir={tmp_path / 'cache'}", "--device=cpu"]
    out = tmp_path / "out"
    predict.main(common + [f"--out_dir={out}"])
    zipped = (out / "submission.zip").read_bytes()
    FullDisk(monkeypatch, out, free=0)
    with pytest.raises(WriteError, match=re.escape(f"cannot write {out / 'submission.zip'}: no space left on "
                                                   f"device; the previous submission.zip is intact")):
        predict.main(common + [f"--out_dir={out}", "--force"])
    assert (out / "submission.zip").read_bytes() == zipped
    with pytest.raises(WriteError, match=re.escape(f"cannot write {tmp_path / 'out' / 'sr'}/")
                       + r"(NIR|RED)/imgset\d+\.png: no space left on device; no partial file was left"):
        valid.main(common + [f"--out_dir={out}", "--save_png"])
    with pytest.raises(WriteError, match=re.escape(f"cannot write {out / 'per_scene.csv'}: no space left on "
                                                   f"device; no partial file was left")):
        valid.main(common + [f"--out_dir={out}"])
    assert sorted(os.listdir(out)) == ["sr", "submission.zip"]
    assert not _temporaries(out, *(out / "sr").iterdir())


# --- one run per folder ----------------------------------------------------------------------------------


def test_a_second_run_into_a_busy_folder_is_refused_and_kill_9_frees_it(synthetic_root, tmp_path):
    run = tmp_path / "run"
    args = _args(synthetic_root, tmp_path)
    cmd = [sys.executable, str(ROOT / "train.py")] + args + [f"--out_dir={run}", "--epochs=100000",
                                                              "--val_every=100000"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last.pt").exists():
            assert first.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.1)
        refusal = (f"{run} is in use by process {first.pid}, which holds {run / '.lock'}: one run per folder; "
                   f"wait for it to end (or stop it), or choose another --out_dir")
        second = subprocess.run(cmd[:-2] + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and second.stderr.strip().splitlines()[-1] == f"error: {refusal}"
        assert "Traceback" not in second.stderr
        with pytest.raises(FolderInUse, match=re.escape(refusal)):
            train.main(args + [f"--out_dir={run}", "--max_steps=2"])  # a new run into it, too
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    epoch = load_checkpoint(run / "checkpoints" / "last.pt")["epoch"]
    train.main(args + [f"--out_dir={run}", "--resume", f"--epochs={epoch + 1}"])  # the kernel freed the lock
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == epoch + 1


def test_the_lock_is_held_for_the_block_only(tmp_path):
    with folder_lock(tmp_path / "r") as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(FolderInUse, match=f"in use by process {os.getpid()}"), folder_lock(tmp_path / "r"):
            pass
        (tmp_path / "r" / "config.json").write_text("{}")
    with folder_lock(tmp_path / "r"):  # released
        pass
    with folder_lock(tmp_path / "empty"):  # a folder it made and nothing was written into: removed again
        pass
    assert not (tmp_path / "empty").exists() and (tmp_path / "r" / ".lock").exists()


# --- on a real small filesystem ----------------------------------------------------------------------------

_SMALL_DISKS = """
set -u
mount -t tmpfs -o size=1200k tmpfs "$CACHE"   # room for one scene cache entry
mount -t tmpfs -o size=8m tmpfs "$DISK"
cd "$ROOT"
"$PY" valid.py $BASELINE --cache_dir="$CACHE" --out_dir="$OUT/valid" > "$OUT/valid.out" 2> "$OUT/valid.err"
echo $? > "$OUT/valid.rc"
ls -A "$CACHE" > "$OUT/cache.ls"
"$PY" train.py $TRAIN --out_dir="$DISK/run" > "$OUT/train.out" 2> "$OUT/train.err" &
pid=$!
while [ ! -e "$DISK/run/checkpoints/last.pt" ]; do kill -0 $pid 2> /dev/null || break; sleep 0.05; done
cat /dev/zero > "$DISK/ballast" 2> /dev/null   # the disk fills up while training goes on
wait $pid; echo $? > "$OUT/train.rc"
"$PY" predict.py $BASELINE --cache_dir= --out_dir="$DISK/predict" > "$OUT/predict.out" 2> "$OUT/predict.err"
echo $? > "$OUT/predict.rc"
ls -A "$DISK/run" "$DISK/run/checkpoints" "$DISK/predict" > "$OUT/disk.ls" 2>&1
cp -a "$DISK/run" "$OUT/run"
mount -t tmpfs -o size=100k tmpfs "$TINY"   # torch.save of 400 kB: a partial write, then ENOSPC
"$PY" -c "$SAVE" "$TINY/x.pt" > "$OUT/save.out" 2>&1
"""

_SAVE = """
import os, sys, torch
from utils.files import WriteError
from utils.runtime import atomic_torch_save
atomic_torch_save({"a": torch.zeros(1000)}, sys.argv[1])
try:
    atomic_torch_save({"a": torch.zeros(100000)}, sys.argv[1])
except WriteError as e:
    print(e)
print(os.listdir(os.path.dirname(sys.argv[1])), torch.load(sys.argv[1])["a"].numel())
"""


def _can_mount_small_disks(tmp: Path) -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    (tmp / "probe").mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp / 'probe'}"],
                           capture_output=True)
    return probe.returncode == 0


def test_the_scripts_on_a_small_filesystem_that_fills_up(synthetic_root, tmp_path):
    if not _can_mount_small_disks(tmp_path):
        pytest.skip("mounting a small filesystem needs unprivileged user and mount namespaces (Linux)")
    out, cache, disk, tiny = tmp_path / "out", tmp_path / "cache", tmp_path / "disk", tmp_path / "tiny"
    for d in (out, cache, disk, tiny):
        d.mkdir()
    baseline = ["--model=baseline", f"--data_dir={synthetic_root}", "--device=cpu"]
    # 3 steps an epoch, no validation but at the end; the JSON of model_args without spaces for the shell
    targs = (common_args(synthetic_root, tmp_path / "t") + [a.replace(" ", "") for a in TINY_QANET]
             + ["--val_every=100000"])
    assert not any(" " in a for a in baseline + targs)
    env = dict(os.environ, ROOT=str(ROOT), PY=sys.executable, OUT=str(out), CACHE=str(cache), DISK=str(disk),
               TINY=str(tiny), SAVE=_SAVE, BASELINE=" ".join(baseline), TRAIN=" ".join(targs + ["--epochs=100000"]))
    subprocess.run(["unshare", "-rm", "bash", "-c", _SMALL_DISKS], env=env, timeout=600, check=True)

    def result(name: str) -> tuple[int, str, str]:
        err = (out / f"{name}.err").read_text()
        return int((out / f"{name}.rc").read_text()), err, err.strip().splitlines()[-1].split("\r")[-1].strip()

    # the cache fills up: one warning, the run goes on, the scores are those without a cache
    rc, err, _ = result("valid")
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert err.count("CacheWarning") == 1, err[-3000:]
    assert f"cannot write the scene cache in {cache} (no space left on device)" in err
    assert not [n for n in (out / "cache.ls").read_text().split() if TEMPORARY.match(n)]
    plain = valid.main(baseline + ["--cache_dir=", f"--out_dir={tmp_path / 'plain'}"])
    assert json.loads((out / "valid" / "summary.json").read_text()) == json.loads(json.dumps(plain))
    # the disk fills up during training: one line saying what is intact, no temporary file
    rc, err, line = result("train")
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    m = re.fullmatch(rf"error: cannot write {re.escape(str(disk))}/run/\S+: (.+); the previous last.pt "
                     rf"\(epoch (\d+), step (\d+)\) is intact: free space and continue with python train.py "
                     rf"--out_dir={re.escape(str(disk))}/run --resume", line)
    assert m, line
    # predict.py on the full disk: one line, no partial zip
    rc, err, line = result("predict")
    assert rc == 1 and "Traceback" not in err and line == (
        f"error: cannot write {disk / 'predict' / 'submission.zip'}: no space left on device; no partial file was left")
    listing = (out / "disk.ls").read_text().split()
    assert not [n for n in listing if TEMPORARY.match(n)] and "submission.zip" not in listing
    # torch.save on a full disk (torch reports "unexpected pos", without the errno): the same error
    assert (out / "save.out").read_text().splitlines() == [
        f"cannot write {tiny / 'x.pt'}: no space left on device; the previous x.pt is intact", "['x.pt'] 1000"]
    # space freed (here: the run moved to a disk with room), it continues to the weights of a run without the fault
    epoch, run = int(m[2]), out / "run"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == epoch
    train.main(targs + [f"--out_dir={run}", "--resume", f"--epochs={epoch + 1}"])
    full = train.main(targs + [f"--out_dir={tmp_path / 'full'}", f"--epochs={epoch + 1}"])
    assert_same_state(full / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
