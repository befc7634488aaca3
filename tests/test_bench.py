"""bench.py runs and prints well-formed figures (no timing is asserted: speed lives in the benchmark)."""
import math
import sys

import pytest

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
