"""utils.tfcheckpoint: the released 3DWDSRNet checkpoints read without TensorFlow; damaged copies refused."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from utils.tfcheckpoint import (
    CheckpointError,
    UnknownTensorError,
    crc32c,
    list_tf_checkpoint,
    read_index,
    read_tf_checkpoint,
)

RELEASED = {"nir": ("wdsr-32-8-6-7-nir-all", 156), "red": ("wdsr-32-8-6-7-red-all", 211)}
VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
# the author's wdsr_3d(3, 32, 8, 6, res_block_b, 7): the kernel (v) of each Keras layer with weights
BLOCK = [(1, 1, 1, 32, 192), (1, 1, 1, 192, 25), (3, 3, 3, 25, 32)]
KERNELS = [(3, 3, 3, 1, 32), *BLOCK * 8, (3, 3, 3, 32, 32), (3, 3, 3, 32, 32),
           (3, 3, 1, 9), (3, 3, 3, 32, 9), (3, 3, 9, 9)]


def released(band: str) -> Path:
    return shared_path("weights", "wdsr3d", RELEASED[band][0])


def model_names(listing) -> list[str]:
    return [n for n in listing if n.startswith("model/") and "/.OPTIMIZER_SLOT/" not in n]


def damaged_copy(band: str, tmp_path: Path) -> Path:
    """A writable copy of a released folder in tmp_path (never touch ../shared)."""
    dst = tmp_path / RELEASED[band][0]
    shutil.copytree(released(band), dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_crc32c_known_values():
    # RFC 3720 (iSCSI) test vectors and the common check value
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


@pytest.mark.parametrize("band", ["nir", "red"])
def test_lists_released_variables(band):
    listing = list_tf_checkpoint(released(band))
    for k, kernel in enumerate(KERNELS):
        layer = f"model/layer_with_weights-{k}"
        assert listing[f"{layer}/v{VALUE}"] == ("float32", kernel)
        assert listing[f"{layer}/g{VALUE}"] == ("float32", kernel[-1:])
        assert listing[f"{layer}/layer/bias{VALUE}"] == ("float32", kernel[-1:])
        assert listing[f"{layer}/initialized{VALUE}"] == ("bool", ())
        for slot in "mv":  # Nadam's two slots per variable
            assert listing[f"{layer}/v/.OPTIMIZER_SLOT/optimizer/{slot}{VALUE}"] == ("float32", kernel)
    assert len(model_names(listing)) == 4 * len(KERNELS)  # no layer beyond the 30
    assert listing["_CHECKPOINTABLE_OBJECT_GRAPH"] == ("string", ())
    assert listing[f"save_counter{VALUE}"] == ("int64", ())


@pytest.mark.parametrize("band", ["nir", "red"])
def test_folder_index_and_prefix_agree(band):
    folder = released(band)
    n = RELEASED[band][1]
    names = [n for n in model_names(list_tf_checkpoint(folder)) if "/initialized/" not in n]
    start = time.perf_counter()
    by_folder = read_tf_checkpoint(folder, names)
    seconds = time.perf_counter() - start
    print(f"{band}: {len(names)} model variables, "
          f"{sum(a.nbytes for a in by_folder.values()) / 1e6:.2f} MB read and verified in {seconds:.3f} s")
    assert seconds < 2.0  # about 0.15 s here; the budget is 1 s, with room for a busy machine
    assert list(by_folder) == names
    assert sum(a.size for a in by_folder.values()) == 329_328  # the network's parameters
    for other in (folder / f"ckpt-{n}.index", folder / f"ckpt-{n}", folder / f"ckpt-{n}.data-00001-of-00002",
                  str(folder / f"ckpt-{n}")):
        again = read_tf_checkpoint(other, names[:6] + names[-6:])
        assert all(np.array_equal(again[k], by_folder[k]) for k in again)
    v = by_folder[f"model/layer_with_weights-0/v{VALUE}"]
    assert v.dtype == np.float32 and v.shape == (3, 3, 3, 1, 32) and v.flags.writeable
    assert all(np.isfinite(a).all() and a.std() > 0 for a in by_folder.values())
    counters = read_tf_checkpoint(folder, [f"save_counter{VALUE}", f"step{VALUE}"])
    assert counters[f"save_counter{VALUE}"].dtype == np.int64 and counters[f"save_counter{VALUE}"] == n
    assert counters[f"step{VALUE}"].dtype == np.int32 and counters[f"step{VALUE}"] > 0


def test_reads_only_what_is_asked_and_skips_strings():
    folder = released("nir")
    name = f"model/layer_with_weights-27/v{VALUE}"
    assert list(read_tf_checkpoint(folder, [name])) == [name]
    assert list(read_tf_checkpoint(folder, name)) == [name]  # one name alone
    everything = read_tf_checkpoint(folder)
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in everything  # a string tensor: listed, not decoded
    assert len(everything) == len(list_tf_checkpoint(folder)) - 1
    with pytest.raises(CheckpointError, match="dtype string"):
        read_tf_checkpoint(folder, ["_CHECKPOINTABLE_OBJECT_GRAPH"])


def test_unknown_name_lists_close_names():
    with pytest.raises(UnknownTensorError, match="close names: model/layer_with_weights-2/g") as err:
        read_tf_checkpoint(released("nir"), ["model/layer_with_weights-2/gg/.ATTRIBUTES/VARIABLE_VALUE"])
    assert isinstance(err.value, KeyError) and "ckpt-156.index" in str(err.value)


def test_flipped_byte_in_data_shard_fails_that_tensor(tmp_path):
    folder = damaged_copy("nir", tmp_path)
    _, _, entries = read_index(folder)
    target = entries[f"model/layer_with_weights-12/v{VALUE}"]
    shard = folder / f"ckpt-156.data-{target.shard:05d}-of-00002"
    flip_byte(shard, target.offset + target.size // 2)
    with pytest.raises(CheckpointError, match=r"layer_with_weights-12/v.*fails its checksum") as err:
        read_tf_checkpoint(folder, [target.name])
    assert str(shard) in str(err.value)
    read_tf_checkpoint(folder, [f"model/layer_with_weights-11/v{VALUE}"])  # the other tensors still read


def test_damaged_or_truncated_files(tmp_path):
    folder = damaged_copy("nir", tmp_path)
    index = folder / "ckpt-156.index"
    good = index.read_bytes()
    flip_byte(index, 100)  # inside the first data block of the table
    with pytest.raises(CheckpointError, match="fails its checksum") as err:
        list_tf_checkpoint(folder)
    assert str(index) in str(err.value)
    index.write_bytes(good[:len(good) // 2])
    with pytest.raises(CheckpointError, match="not a TensorFlow checkpoint index, or it is truncated"):
        list_tf_checkpoint(index)
    index.write_bytes(good)
    shard = folder / "ckpt-156.data-00001-of-00002"
    shard.write_bytes(shard.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"truncated \(100000 bytes; tensor"):
        read_tf_checkpoint(folder)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="ckpt-156.data-00001-of-00002"):
        read_tf_checkpoint(folder)


def test_foreign_file_and_missing_files(tmp_path):
    foreign = tmp_path / "ckpt-1.index"
    shutil.copyfile(shared_path("fixtures", "wdsr3d_reference.pt"), foreign)  # a torch file renamed
    with pytest.raises(CheckpointError, match="bad magic number.*not a TensorFlow checkpoint index") as err:
        read_tf_checkpoint(foreign)
    assert str(foreign) in str(err.value)
    (tmp_path / "ckpt-2.index").write_bytes(b"tiny")
    with pytest.raises(CheckpointError, match="bad magic"):
        list_tf_checkpoint(tmp_path / "ckpt-2")
    with pytest.raises(FileNotFoundError, match="without a 'checkpoint' file"):
        list_tf_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="ckpt-9.index"):
        list_tf_checkpoint(tmp_path / "ckpt-9")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-7"\n')
    with pytest.raises(FileNotFoundError, match=r"ckpt-7.index \(named by"):
        list_tf_checkpoint(tmp_path)
    (tmp_path / "checkpoint").write_text("all_model_checkpoint_paths: nothing\n")
    with pytest.raises(CheckpointError, match="no model_checkpoint_path"):
        list_tf_checkpoint(tmp_path)
