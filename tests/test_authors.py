"""The authors' code behind our benchmark: each zoo model's ``authors_network`` finds their files in a
checkout, builds their class from their configuration, and calls their forward as their code does.
Their code is not here: the checkouts below are stand-ins with the authors' layout, whose classes
record what they are given."""
import json

import pytest
import torch

import bench
from models import spec_of
from models.authors import ViewsForward, exec_source, read_json_section

# each torch zoo model: (source file, class name, configuration file) in the authors' repository
LAYOUTS = {
    "highresnet": ("src/DeepNetworks/HRNet.py", "HRNet", "config/config.json"),
    "misrgru": ("src/DeepNetworks/MISRGRU.py", "MISRGRU", "config.json"),
    "trmisr": ("src/DeepNetworks/TRNet.py", "TRNet", "config/config.json"),
}

# a stand-in network: records its configuration and every call; a 3x upscaler of the frames' mean
STAND_IN = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
CALLS = []

class {name}(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(1, 9, 3, padding=1)

    def forward(self, lrs, alphas, *args, **kwargs):
        CALLS.append((tuple(lrs.shape), alphas, args, kwargs))
        return F.pixel_shuffle(self.conv(lrs.mean(1, keepdim=True)), 3)
'''


def _checkout(root, name: str, network: dict):
    source, cls, config = LAYOUTS[name]
    (root / source).parent.mkdir(parents=True, exist_ok=True)
    (root / source).write_text(STAND_IN.format(name=cls))
    (root / config).parent.mkdir(parents=True, exist_ok=True)
    (root / config).write_text(json.dumps({"network": network, "training": {"batch_size": 4}}))
    return root


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_authors_network_builds_their_class_from_their_config(tmp_path, name):
    network = {"encoder": {"channel_size": 5}, "marker": name}
    net = spec_of(name).authors_network(str(_checkout(tmp_path, name, network)))
    assert isinstance(net, ViewsForward) and net.net.config == network  # their "network" section, as is
    lr = torch.rand(2, 5, 8, 8)
    sr = net(lr)
    assert sr.shape == (2, 1, 24, 24)
    import sys
    calls = sys.modules[f"{name}_authors"].CALLS
    shape, alphas, args, kwargs = calls[-1]
    assert shape == (2, 5, 8, 8) and alphas.shape == (2, 5) and bool((alphas == 1).all())  # every view real
    # TR-MISR's forward takes the maps and the patch side K, as their train.py passes them
    assert kwargs == ({"maps": None, "K": 8} if name == "trmisr" else {})


def test_a_checkout_without_their_files_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="HRNet.py"):
        spec_of("highresnet").authors_network(str(tmp_path))
    (tmp_path / "c.json").write_text(json.dumps({"training": {}}))
    with pytest.raises(ValueError, match="c.json.*'network'"):
        read_json_section(tmp_path / "c.json", "network")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        exec_source(tmp_path / "missing.py", "missing")


def test_zoo_benchmark_times_ours_against_the_authors_code(tmp_path, capsys):
    # the whole command on a stand-in HighRes-net checkout: one row with both sides and their ratio
    ref = _checkout(tmp_path, "highresnet", {})
    bench.main(["zoo", "--models=highresnet", f"--ref=highresnet={ref}", "--batch=1", "--repeat=1",
                "--malloc=system"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("highresnet")]
    assert len(rows) == 1
    # highresnet  32 x 64x64  ours authors ratio  16  ours authors ratio
    r = rows[0]
    assert r[1:4] == ["32", "x", "64x64"] and r[7] == "16"
    train_ours, train_theirs, scene_ours, scene_theirs = float(r[4]), float(r[5]), float(r[8]), float(r[9])
    assert train_ours > 0 and scene_ours > 0 and train_theirs >= 0 and scene_theirs >= 0  # the stand-in is tiny
    for ratio, theirs, ours in ((r[6], train_theirs, train_ours), (r[10], scene_theirs, scene_ours)):
        assert ratio.endswith("x") and float(ratio[:-1]) == pytest.approx(theirs / ours, rel=0.02, abs=0.011)


def test_zoo_benchmark_rejects_a_checkout_for_a_model_it_does_not_time():
    with pytest.raises(SystemExit, match="wdsr3d"):
        bench.main(["zoo", "--models=highresnet", "--ref=wdsr3d=/nowhere", "--malloc=system"])
