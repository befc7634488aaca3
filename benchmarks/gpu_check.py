"""``python bench.py gpu-check``: every GPU path of train.py, valid.py and predict.py once, in minutes.

Run it on a new machine, after a torch, CUDA or driver upgrade, or before a long run on a GPU
nobody has trained on yet. Each path (a preset in a precision, CUDA graphs, the gradient scaler,
the moving average, torch.compile, gradient accumulation, the self-ensemble, another GPU, torchrun)
trains a tiny network for a few steps on a small synthetic dataset made in a work folder, in its
own process, so that a crash in one path is reported and the others still run. One line per path::

    gpu-check on cuda: 1 CUDA GPU (NVIDIA H100 80GB HBM3), torch 2.5.1, CUDA 12.4
    PASS  qanet-bf16        9.1s
    FAIL  qanet-fp16        4.2s  RuntimeError: CUDA error: an illegal memory access was encountered
    SKIP  torchrun-qanet    0.0s  needs 2 GPUs (1 visible)
    28 passed, 1 failed, 3 skipped in 412.0s

The exit status is 1 when a path failed, 2 when nothing ran (no CUDA GPU: every CUDA path is
skipped). ``--device=cpu`` runs the paths that make sense on a CPU (every preset in float32 and in
bf16, the moving average, valid.py/predict.py with the self-ensemble), so that CI exercises the
command itself. ``--list`` names the paths, ``--only=A,B`` runs some (and the run they read). A
failed path keeps the work folder: its run folders and one log per path (``logs/NAME.log``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["Check", "Context", "checks", "network", "tiny", "add_arguments", "main", "FAST"]

ROOT = Path(__file__).resolve().parents[1]  # the project folder: train.py, valid.py, predict.py, tests/


def tiny(model: str) -> dict:
    """The network of an authors' preset (model_args {}: their published size) cut to a few thousand
    parameters (``ModelSpec.smoke_args``): the check is of code paths (capture, precision,
    processes), not of speed or quality. Presets that name a small network already (demo, cpu_real,
    cpu_real_qanet) keep their own."""
    from models import spec_of
    return dict(spec_of(model).smoke_args)


def default_preset() -> str:
    """The preset of ``Config()`` (the one whose recipe the defaults are), for the single-option checks."""
    from config import Config
    return Config().preset


def authors_presets() -> list[str]:
    """The presets of the authors' recipes (each trainable model's ``ModelSpec.preset``): torchrun runs each."""
    from models import MODELS
    return [spec.preset for spec in MODELS.values() if spec.trainable and spec.preset]

# A few steps and one small validation: each path runs start to finish (train, validate, save) in
# seconds. min_clear 0: synthetic patches are rarely as clear as the real recipes ask (TR-MISR keeps
# grid patches 85% clear), and a run left without patches would check nothing.
FAST = ["--batch_size=2", "--epochs=1", "--max_steps=3", "--val_every=1", "--val_scenes=2", "--n_images=1",
        "--num_workers=0", "--min_clear=0"]

# the line of a failed process worth reporting: an exception, train.py's "error: ...", a pytest failure
ERROR_LINE = re.compile(r"Error|Exception|error:|FAILED|Killed|Aborted|core dumped")


@dataclass
class Context:
    """What the commands are built from: the work folder, the device and what the machine has."""

    work: Path  # data, decode cache, run folders (runs/NAME) and logs (logs/NAME.log)
    device: str  # cpu | cuda | cuda:N, given to every script
    n_gpus: int  # CUDA GPUs torch sees
    data_dir: Path | None = None  # the dataset root; None: generated on first use

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def data(self) -> Path:
        """The dataset root, generated into the work folder on first use (about 10 s on 2 cores; a
        work folder that has one already reuses it: generation is atomic, never half done)."""
        if self.data_dir is None:
            root = self.work / "data"
            if not root.exists():
                from data.synthetic import generate
                generate(root, n_train=4, n_val=2, n_test=1, seed=1)
            self.data_dir = root
        return self.data_dir

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name


Command = Callable[[Context, Path], list[str]]  # (context, the check's run folder) -> argv


@dataclass(frozen=True)
class Check:
    """One path: a command, run in the project folder, that must end well.

    Attributes:
        name: what ``--only`` selects and the report names.
        command: ``f(context, run folder) -> argv``, the interpreter first.
        needs: ``any`` (the device chosen, CPU or CUDA), ``cuda`` (a CUDA device chosen and present)
            or ``cuda2`` (two CUDA GPUs or more).
        what: one line for ``--list``.
        after: the check whose run folder (checkpoint) this one reads: run first, also under ``--only``.
        expect: a line of the standard output that says the script got to its end (a regular expression).
        refusal: a path the scripts may refuse on purpose: a one-line ``error: ...`` (no traceback) that
            matches this passes too, reported as refused.
        timeout: seconds before the process and its children are killed and the path fails.
    """

    name: str
    command: Command
    needs: str = "any"
    what: str = ""
    after: str = ""
    expect: str = r"^finished:"
    refusal: str = ""
    timeout: float = 240.0


def network(preset: str) -> tuple[str, dict]:
    """``(model, model_args)`` that the checks train for ``preset``: its own, with TINY's arguments
    where the preset trains its model at full size (model_args {}). Resolved as train.py resolves
    the preset: a preset may leave out what the defaults say."""
    from config import parse_args
    cfg = parse_args([f"--preset={preset}"])
    return cfg.model, cfg.model_args or tiny(cfg.model)


def _model_args(preset: str) -> list[str]:
    args = network(preset)[1]
    return [f"--model_args={json.dumps(args)}"] if args else []


def _files(ctx: Context, out: Path) -> list[str]:
    # one decode cache for all runs: the scenes are decoded once, by the first run
    return [f"--data_dir={ctx.data}", f"--cache_dir={ctx.work / 'cache'}", f"--out_dir={out}"]


def train(preset: str, *flags: str, graphs: bool = False, last_gpu: bool = False) -> Command:
    """train.py with ``preset``'s recipe on a tiny network for a few steps, then ``flags``.
    ``graphs``: replayed as CUDA graphs where the device is CUDA (eager on a CPU, which has none);
    ``last_gpu``: on the machine's last GPU (``--device=cuda:N``, not the default GPU 0)."""
    def command(ctx: Context, out: Path) -> list[str]:
        device = f"cuda:{ctx.n_gpus - 1}" if last_gpu else ctx.device
        capture = ["--cuda_graphs=true"] if graphs and ctx.cuda else []
        return [sys.executable, "train.py", f"--preset={preset}", *_model_args(preset), *_files(ctx, out), *FAST,
                f"--device={device}", *flags, *capture]
    return command


def torchrun(preset: str, *flags: str) -> Command:
    """train.py in two processes on two GPUs (``torchrun --standalone --nproc_per_node=2``)."""
    def command(ctx: Context, out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                f"--preset={preset}", *_model_args(preset), *_files(ctx, out), *FAST, "--device=cuda", *flags]
    return command


def evaluate(script: str, source: str) -> Command:
    """valid.py or predict.py with the self-ensemble on the last checkpoint of check ``source``
    (its data, precision and frame rules come from the checkpoint, as for a user's run)."""
    def command(ctx: Context, out: Path) -> list[str]:
        ckpt = ctx.run_dir(source) / "checkpoints" / "last.pt"
        return [sys.executable, script, f"--checkpoint={ckpt}", f"--out_dir={out}", f"--device={ctx.device}",
                "--ensemble"]
    return command


def pytest_cuda(ctx: Context, out: Path) -> list[str]:
    """tests/test_cuda.py: graph replays against eager (alphas, baseline residual, scaler, EMA), fused Adam."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]


def checks() -> list[Check]:
    """The paths, in the order they run: every preset of ``config.PRESETS`` (a preset added later is
    checked with no change here) in three precisions, then the options that change how a step runs."""
    from config import PRESETS
    table = []
    for p in PRESETS:
        table += [Check(f"{p}-fp32", train(p, "--amp=off"), "any", f"--preset={p}: float32, eager (the default)"),
                  Check(f"{p}-bf16", train(p, "--amp=bf16", graphs=True), "any",
                        f"--preset={p} --amp=bf16, on a GPU with --cuda_graphs=true (README's fastest)"),
                  Check(f"{p}-fp16", train(p, "--amp=fp16"), "cuda",
                        f"--preset={p} --amp=fp16: float16 with the gradient scaler")]
    first = default_preset()
    bf16_graphs = f"{first}-bf16"  # the checkpoint valid.py and predict.py read: trained with graphs + bf16 on a GPU
    table += [
        Check("ema", train(first, "--amp=bf16", "--ema=0.99", graphs=True), "any",
              f"{first} with a moving average of weights and BatchNorm statistics (--ema=0.99), graphs on a GPU"),
        Check("compile", train(first, "--amp=bf16", "--compile=true"), "cuda",
              f"{first} under torch.compile (--compile=true, bf16): a minute or more of compilation", timeout=600),
        # the trainer sums micro-batches through the graph as eager autograd does
        Check("accum2-graphs", train(first, "--amp=bf16", "--accum_steps=2", graphs=True), "cuda",
              "--accum_steps=2 with CUDA graphs: trains, or is refused with a one-line error", refusal="accum"),
        Check("valid-ensemble", evaluate("valid.py", bf16_graphs), "any",
              f"valid.py --ensemble on {bf16_graphs}'s checkpoint", after=bf16_graphs, expect=r"^Kelvin score: \d"),
        Check("predict-ensemble", evaluate("predict.py", bf16_graphs), "any",
              f"predict.py --ensemble on {bf16_graphs}'s checkpoint", after=bf16_graphs,
              expect=r"^wrote .*submission\.zip"),
        Check("last-gpu", train(first, "--amp=bf16", graphs=True, last_gpu=True), "cuda2",
              f"{first} bf16 + graphs on the last GPU (--device=cuda:N)"),
        *[Check(f"torchrun-{p}", torchrun(p, "--amp=bf16"), "cuda2",
                f"--preset={p}, torchrun on 2 GPUs: DDP over NCCL, SyncBatchNorm, unused heads", timeout=360)
          for p in authors_presets()],
        Check("pytest-cuda", pytest_cuda, "cuda", "python -m pytest -q tests/test_cuda.py",
              expect=r"\d+ passed", timeout=600),
    ]
    return table


def select(table: list[Check], only: str) -> list[Check]:
    """The checks ``--only`` names (comma-separated) and the ones they read, in table order."""
    if not only:
        return table
    by_name = {c.name: c for c in table}
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"gpu-check --only: unknown check(s) {', '.join(unknown)}; --list names them")
    keep: set[str] = set()
    for name in wanted:
        while name and name not in keep:  # a check, then the one whose checkpoint it reads
            keep.add(name)
            name = by_name[name].after
    return [c for c in table if c.name in keep]


def skip_reason(check: Check, ctx: Context, results: dict[str, str]) -> str:
    """Why ``check`` cannot run here ("" when it can)."""
    if (ctx.cuda or check.needs != "any") and not torch.cuda.is_available():
        return "no CUDA GPU"
    if check.needs != "any" and not ctx.cuda:
        return "needs CUDA (--device=cpu)"
    if check.needs == "cuda2" and ctx.n_gpus < 2:
        return f"needs 2 GPUs ({ctx.n_gpus} visible)"
    if check.after and results.get(check.after) != "PASS":
        return f"needs {check.after}, which did not pass"
    return ""


def run(argv: list[str], timeout: float) -> tuple[int | None, str, str]:
    """Run ``argv`` in the project folder: ``(exit status, None on a timeout; stdout; stderr)``.

    The process leads its own group, killed whole on a timeout or Ctrl-C: torchrun's workers too."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        return None, out, err
    finally:
        if proc.poll() is None:  # Ctrl-C here: the child's group is in its own session, so never got it
            _kill_group(proc.pid)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # the group ended on its own meanwhile
        pass


def last_error(*texts: str) -> str:
    """The last line that reads like an error, from the first of ``texts`` that has one (progress
    bars' carriage returns split lines too); else the last line of output."""
    split = [[ln.strip() for ln in re.split(r"[\r\n]+", t) if ln.strip()] for t in texts]
    for lines in split:
        hits = [ln for ln in lines if ERROR_LINE.search(ln)]
        if hits:
            return hits[-1]
    tails = [lines[-1] for lines in split if lines]
    return tails[0] if tails else "no output"


def judge(check: Check, code: int | None, out: str, err: str) -> tuple[str, str]:
    """``(PASS | FAIL, reason)`` of a finished process."""
    if code is None:
        return "FAIL", f"timed out after {check.timeout:.0f}s"
    if code == 0:
        if re.search(check.expect, out, re.M):
            return "PASS", ""
        return "FAIL", f"exit status 0 but no output line matches {check.expect!r}"
    line = last_error(err, out)
    if code < 0:  # killed by a signal: a segfault prints nothing of its own
        try:
            line = f"killed by {signal.Signals(-code).name}; last line: {line}"
        except ValueError:
            line = f"killed by signal {-code}; last line: {line}"
    elif check.refusal and "Traceback" not in err and line.startswith("error:") and re.search(check.refusal, line):
        return "PASS", f"refused: {line}"
    return "FAIL", line


def run_check(check: Check, ctx: Context, results: dict[str, str]) -> tuple[str, float, str]:
    """``(PASS | FAIL | SKIP, seconds, reason)`` of one check; its output goes to ``logs/NAME.log``."""
    reason = skip_reason(check, ctx, results)
    if reason:
        return "SKIP", 0.0, reason
    out = ctx.run_dir(check.name)
    shutil.rmtree(out, ignore_errors=True)  # a work folder used before: train.py would ask for --resume
    try:
        argv = check.command(ctx, out)  # the first one generates the data: not part of its time
    except Exception as e:  # a broken table or dataset fails this path, not the whole run
        return "FAIL", 0.0, f"{type(e).__name__}: {e}"
    t = time.perf_counter()
    code, stdout, stderr = run(argv, check.timeout)
    seconds = time.perf_counter() - t
    log = ctx.work / "logs" / f"{check.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {shlex.join(argv)}\nexit status: {code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    status, reason = judge(check, code, stdout, stderr)
    return status, seconds, reason[:200]


def header(ctx: Context) -> str:
    """The device name, GPU count and versions: what a report has to be read against."""
    n = ctx.n_gpus
    if n:
        index = (torch.device(ctx.device).index or 0) if ctx.cuda else 0
        gpus = f"{n} CUDA GPU{'s' if n > 1 else ''} ({torch.cuda.get_device_name(index)})"
    else:
        gpus = "no CUDA GPU"
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    cpu = "" if ctx.cuda else f", CPU {platform.machine()} x{os.cpu_count()}"
    return f"gpu-check on {ctx.device}: {gpus}, torch {torch.__version__}{cuda}{cpu}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", type=_device,
                   help="cuda (default) | cuda:N | cpu: the CPU paths only, e.g. for CI without a GPU")
    p.add_argument("--only", default="", help="comma-separated check names (--list); the runs they read come too")
    p.add_argument("--list", action="store_true", help="print the checks (name, needs, what) and exit")
    p.add_argument("--data_dir", default="", help="a small dataset root to use instead of generating one")
    p.add_argument("--work_dir", default="", help="where runs and logs go, kept (default: a temporary folder, "
                                                  "deleted unless a check failed)")


def _device(value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"{value!r}: cpu, cuda or cuda:N")
    return value


def main(args: argparse.Namespace) -> None:
    """Run the checks ``args`` select, one line each; SystemExit(1) when one failed, (2) when none ran."""
    table = select(checks(), args.only)
    if args.list:
        width = max(len(c.name) for c in table)
        for c in table:
            print(f"{c.name:<{width}}  {c.needs:<5}  {c.what}")
        return
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = torch.device(args.device).index
    if index is not None and n_gpus and index >= n_gpus:
        raise SystemExit(f"gpu-check --device={args.device}: torch sees {n_gpus} GPU(s)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(work, args.device, n_gpus, Path(args.data_dir) if args.data_dir else None)
    print(header(ctx), flush=True)
    results: dict[str, str] = {}
    width, t0 = max(len(c.name) for c in table), time.perf_counter()
    for check in table:
        status, seconds, reason = run_check(check, ctx, results)
        results[check.name] = status
        print(f"{status}  {check.name:<{width}}  {seconds:5.1f}s  {reason}".rstrip(), flush=True)
    counts = {s: sum(r == s for r in results.values()) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    if counts["FAIL"] or args.work_dir:
        print(f"run folders and logs (logs/NAME.log): {work}")
    elif work.exists():
        shutil.rmtree(work, ignore_errors=True)
    if counts["FAIL"]:
        raise SystemExit(1)
    if not counts["PASS"]:
        why = "no CUDA GPU visible to torch; --device=cpu runs the CPU paths" if not n_gpus else "all skipped"
        print(f"nothing ran: {why}")
        raise SystemExit(2)
