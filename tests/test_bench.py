"""bench.py runs and prints well-formed figures (no timing is asserted: speed lives in the benchmark)."""
import math
import re
import sys

import pytest
import torch

import bench


def _rows(out: str, first: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.split()[:1] == [first]]


def test_models_prints_throughput_and_peak_memory(capsys):
    bench.main(["models", "--device=cpu", "--models=qanet", "--impls=ours,ours-cl", "--batch=1",
                "--patch=8", "--steps=1", "--warmup=0", "--malloc=system"])
    rows = _rows(capsys.readouterr().out, "qanet")
    assert [r[1] for r in rows] == ["ours", "ours-cl"]
    for r in rows:
        samples_s, ms, peak = float(r[5]), float(r[6]), float(r[7])
        assert samples_s > 0 and ms > 0 and abs(1000 / ms - samples_s) < 0.02 * samples_s + 0.01
        if sys.platform.startswith("linux"):  # per-row resident peak from /proc: the model and its step
            assert 100 < peak < 8192
        else:
            assert math.isnan(peak)


def test_models_rejects_unknown_implementation():
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["models", "--device=cpu", "--models=qanet", "--impls=theirs", "--malloc=system"])


def test_losses_prints_a_time_for_every_training_loss(capsys):
    from utils.losses import LOSSES
    bench.main(["losses", "--device=cpu", "--batch=2", "--patch=16", "--malloc=system"])
    out = capsys.readouterr().out
    times = {r[0]: float(r[1]) for r in (line.split() for line in out.splitlines()) if r and r[0] in LOSSES}
    assert set(times) == set(LOSSES)
    assert all(t > 0 for t in times.values())


# --- gpu-check: one line per path, a failing path fails the command ------------------------------------------------

GPU_CHECK_LINE = re.compile(r"^(PASS|FAIL|SKIP)  (\S+) +(\d+\.\d)s(?:  (.*))?$")


def _report(out: str) -> tuple[list[str], dict[str, tuple[str, float, str]], str]:
    """``(other lines, {name: (status, seconds, reason)}, summary line)`` of a gpu-check report."""
    rows, other = {}, []
    for line in out.splitlines():
        m = GPU_CHECK_LINE.match(line)
        if m:
            rows[m[2]] = (m[1], float(m[3]), m[4] or "")
        else:
            other.append(line)
    summary = next(line for line in other if re.fullmatch(r"\d+ passed, \d+ failed, \d+ skipped in [\d.]+s", line))
    return other, rows, summary


def test_gpu_check_lists_a_path_per_preset_and_precision(capsys):
    from config import PRESETS
    bench.main(["gpu-check", "--list"])
    listed = {r[0]: r[1] for r in (line.split() for line in capsys.readouterr().out.splitlines())}
    for preset in PRESETS:  # new presets are checked without a change to the table
        assert listed[f"{preset}-fp32"] == listed[f"{preset}-bf16"] == "any" and listed[f"{preset}-fp16"] == "cuda"
    assert {listed[n] for n in ("ema", "valid-ensemble", "predict-ensemble")} == {"any"}
    assert {listed[n] for n in ("compile", "accum2-graphs", "pytest-cuda")} == {"cuda"}
    assert {listed[n] for n in ("last-gpu", "torchrun-qanet", "torchrun-piunet", "torchrun-wdsr3d")} == {"cuda2"}


def test_gpu_check_trains_every_preset_on_a_small_network():
    """A preset of the authors' full-size network (model_args {}) needs its model's ModelSpec.smoke_args:
    a full-size network would take the check past its minutes (and a CPU run past its hour)."""
    from benchmarks import gpu_check
    from config import PRESETS, parse_args
    full_size = [p for p in PRESETS if not gpu_check.network(p)[1]]
    assert not full_size, f"give the model of preset(s) {full_size} its ModelSpec.smoke_args"
    for p in PRESETS:  # the recipe's own small network is kept as it is
        own = parse_args([f"--preset={p}"]).model_args
        assert gpu_check.network(p)[1] == (own or gpu_check.tiny(parse_args([f"--preset={p}"]).model))
    assert gpu_check.network("qanet") == ("qanet", gpu_check.tiny("qanet"))


def test_gpu_check_on_cpu_trains_then_validates_with_the_ensemble(synthetic_root, tmp_path, capsys):
    """valid-ensemble reads qanet-bf16's checkpoint: --only runs that first. Two processes, ~30 s."""
    bench.main(["gpu-check", "--device=cpu", "--only=valid-ensemble", f"--data_dir={synthetic_root}",
                f"--work_dir={tmp_path}"])
    other, rows, summary = _report(capsys.readouterr().out)
    assert re.match(r"gpu-check on cpu: .*torch \S+", other[0])
    assert list(rows) == ["qanet-bf16", "valid-ensemble"]
    assert all(status == "PASS" and seconds > 0 and not reason for status, seconds, reason in rows.values())
    assert summary.startswith("2 passed, 0 failed, 0 skipped")
    assert (tmp_path / "runs" / "qanet-bf16" / "checkpoints" / "last.pt").exists()
    assert "--ensemble" in (tmp_path / "logs" / "valid-ensemble.log").read_text().splitlines()[0]


def test_gpu_check_reports_a_failing_path_and_exits_non_zero(tmp_path, capsys, monkeypatch):
    from benchmarks import gpu_check
    Check = gpu_check.Check

    def python(code: str):
        return lambda ctx, out: [sys.executable, "-c", code]

    table = [Check("broken", lambda ctx, out: [sys.executable, "train.py", "--no_such_option=1"]),
             Check("reads-broken", python("print('finished: never run')"), after="broken"),
             Check("hangs", python("import time; time.sleep(60)"), timeout=1),
             Check("refused", python("import sys; sys.exit('error: accum_steps=2 is refused')"), refusal="accum"),
             Check("crashes", python("raise RuntimeError('accum went wrong')"), refusal="accum"),
             Check("silent", python("print('done')")),
             Check("fine", python("print('finished: ok')"))]
    monkeypatch.setattr(gpu_check, "checks", lambda: table)
    with pytest.raises(SystemExit) as stop:
        bench.main(["gpu-check", "--device=cpu", f"--work_dir={tmp_path}"])
    assert stop.value.code == 1
    _, rows, summary = _report(capsys.readouterr().out)
    assert rows["broken"][0] == "FAIL" and rows["broken"][2].startswith("error: unknown option --no_such_option")
    assert rows["reads-broken"] == ("SKIP", 0.0, "needs broken, which did not pass")
    assert rows["hangs"][0] == "FAIL" and rows["hangs"][2] == "timed out after 1s" and rows["hangs"][1] < 30
    assert rows["refused"] == ("PASS", rows["refused"][1], "refused: error: accum_steps=2 is refused")
    assert rows["crashes"][:1] + rows["crashes"][2:] == ("FAIL", "RuntimeError: accum went wrong")
    assert rows["silent"][0] == "FAIL" and "no output line matches" in rows["silent"][2]
    assert rows["fine"][0] == "PASS"
    assert summary.startswith("2 passed, 4 failed, 1 skipped")
    assert "unknown option" in (tmp_path / "logs" / "broken.log").read_text()


def test_gpu_check_without_cuda_skips_every_path_without_running_it(capsys, monkeypatch):
    from benchmarks import gpu_check

    def run(argv, timeout):
        raise AssertionError(f"nothing may run without a CUDA GPU: {argv}")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run", run)
    with pytest.raises(SystemExit) as stop:
        bench.main(["gpu-check"])  # the default: --device=cuda
    assert stop.value.code == 2  # nothing ran: a GPU check that checked nothing is not a pass
    other, rows, summary = _report(capsys.readouterr().out)
    assert other[0].startswith("gpu-check on cuda: no CUDA GPU")
    assert list(rows) == [c.name for c in gpu_check.checks()]
    assert {status for status, _, _ in rows.values()} == {"SKIP"}
    assert {reason for _, _, reason in rows.values()} == {"no CUDA GPU"}
    assert summary.startswith(f"0 passed, 0 failed, {len(rows)} skipped") and "nothing ran" in other[-1]


def test_gpu_check_on_cpu_runs_exactly_the_paths_that_need_no_gpu(capsys, monkeypatch):
    from benchmarks import gpu_check
    ran = []

    def run(argv, timeout):  # every script "succeeds" at once: only the choice of paths is tested
        ran.append(argv)
        return 0, "finished: ok\nKelvin score: 1.0\nwrote x/submission.zip\n", ""

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run", run)
    monkeypatch.setattr(gpu_check.Context, "data", property(lambda self: self.work / "data"))  # not generated
    bench.main(["gpu-check", "--device=cpu"])
    _, rows, _ = _report(capsys.readouterr().out)
    needs = {c.name: c.needs for c in gpu_check.checks()}
    assert {n for n, r in rows.items() if r[0] == "PASS"} == {n for n, need in needs.items() if need == "any"}
    assert {n for n, r in rows.items() if r[0] == "SKIP"} == {n for n, need in needs.items() if need != "any"}
    assert len(ran) == sum(need == "any" for need in needs.values())
    for argv in ran:  # on a CPU: no CUDA flag, every script on the CPU; every training run on a small network
        assert "--device=cpu" in argv and not any(a.startswith(("--cuda_graphs", "--compile")) for a in argv)
        assert argv[1] != "train.py" or any(a.startswith("--model_args={") for a in argv)
