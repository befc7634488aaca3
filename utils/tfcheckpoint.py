"""Read TensorFlow 2 checkpoints (tensor bundles) with NumPy alone: no TensorFlow, no protobuf library.

A TF2 object-based checkpoint ``ckpt-N`` is a *tensor bundle*:

* ``ckpt-N.index``: a LevelDB-style sorted table (SSTable). Its key ``""`` holds a
  ``BundleHeaderProto`` (number of data shards, byte order); every other key is a tensor name
  (``model/layer_with_weights-0/g/.ATTRIBUTES/VARIABLE_VALUE``) holding a ``BundleEntryProto``:
  dtype, shape, shard, byte offset and size in that shard, and the masked CRC-32C of the bytes.
* ``ckpt-N.data-0000S-of-0000M``: the tensors' raw bytes, back to back.
* the folder's ``checkpoint`` text file names the latest prefix (``model_checkpoint_path: "ckpt-N"``).

The reader decodes just enough of the table format and of the protobuf wire format for this,
verifies every table block's checksum and every tensor's checksum, and reads only the tensors
asked for. It never executes anything from the files (no pickle, no graph). Errors name the file.

Base layer: imports nothing of the project's own packages.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["read_tf_checkpoint", "list_tf_checkpoint", "read_index", "resolve_checkpoint", "crc32c",
           "TensorEntry", "CheckpointError", "UnknownTensorError"]

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's table magic, the last 8 bytes of an index file (little-endian)
_FOOTER_SIZE = 48  # two BlockHandles as varints, zero-padded to 40 bytes, then the magic
_BLOCK_TRAILER = 5  # one compression-type byte, then the block's masked crc32c (fixed32)

# TensorFlow's DataType enum (types.proto) -> NumPy dtype, for the types with a plain byte layout.
# DT_STRING (7) is stored in another layout; DT_BFLOAT16 (14) has no NumPy dtype.
_DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 8: "complex64",
           9: "int64", 10: "bool", 17: "uint16", 18: "complex128", 19: "float16", 22: "uint32", 23: "uint64"}
_DTYPE_NAMES = {7: "string", 14: "bfloat16", 20: "resource", 21: "variant"}


class CheckpointError(ValueError):
    """A checkpoint file that is not what it should be: foreign, truncated, damaged or unsupported."""


class UnknownTensorError(KeyError):
    """A tensor name the checkpoint does not hold (the message lists close names)."""

    def __str__(self) -> str:  # KeyError would show the message quoted, as a repr
        return str(self.args[0])


class _Corrupt(Exception):
    """Malformed bytes, raised by the decoders and re-raised as CheckpointError with the file's name."""


@dataclass(frozen=True)
class TensorEntry:
    """One ``BundleEntryProto``: where a tensor's bytes are and what they hold."""

    name: str
    dtype_code: int  # TensorFlow's DataType enum
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int  # bytes
    crc32c: int  # masked CRC-32C of the bytes, as stored
    sliced: bool  # a partitioned variable (stored in slices): not supported

    @property
    def dtype(self) -> str:
        """NumPy dtype name, or TensorFlow's name for a type this reader does not decode."""
        return _DTYPES.get(self.dtype_code) or _DTYPE_NAMES.get(self.dtype_code, f"DT_{self.dtype_code}")

    @property
    def readable(self) -> bool:
        return self.dtype_code in _DTYPES and not self.sliced


# --- CRC-32C (Castagnoli), table-driven -----------------------------------------------------------------------------

def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        c = byte
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)  # the reflected Castagnoli polynomial
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``). Pure Python: about 6 MB/s,
    plenty for a model's few MB."""
    table, reg = _CRC_TABLE, 0xFFFFFFFF
    for b in data:
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg ^ 0xFFFFFFFF


def _masked_crc(data: bytes | bytearray | memoryview) -> int:
    # LevelDB and TensorFlow store a rotated, offset CRC: a CRC of data that embeds CRCs stays informative
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format and table blocks ---------------------------------------------------------------------------

def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos`` -> (value, position after it)."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise _Corrupt("a varint runs past the end of its buffer")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("a varint longer than 10 bytes")


def _fields(buf: bytes | memoryview) -> Iterator[tuple[int, int | bytes]]:
    """The fields of a protobuf message -> (field number, value): an int for varint, fixed32 and
    fixed64 fields, bytes for length-delimited ones (sub-messages, strings, packed arrays)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise _Corrupt("a fixed-width field runs past the end of its message")
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _Corrupt("a length-delimited field runs past the end of its message")
            value, pos = bytes(buf[pos:pos + length]), pos + length
        else:
            raise _Corrupt(f"protobuf wire type {wire} (field {number}) is not used by tensor bundles")
        yield number, value


def _block_handle(buf: bytes | memoryview, pos: int = 0) -> tuple[tuple[int, int], int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return (offset, size), pos


def _read_block(data: bytes, handle: tuple[int, int]) -> memoryview:
    """A table block's contents, its trailer checked (no compression, masked crc32c)."""
    offset, size = handle
    end = offset + size
    if end + _BLOCK_TRAILER > len(data) - _FOOTER_SIZE:
        raise _Corrupt(f"the block at offset {offset} ({size} bytes) runs past the end of the file: truncated")
    kind = data[end]
    stored = int.from_bytes(data[end + 1:end + _BLOCK_TRAILER], "little")
    if _masked_crc(memoryview(data)[offset:end + 1]) != stored:
        raise _Corrupt(f"the block at offset {offset} fails its checksum: the file is damaged")
    if kind != 0:
        raise _Corrupt(f"the block at offset {offset} is compressed (type {kind}; 1 = snappy); "
                       "only uncompressed tables (TensorFlow's default for bundles) are supported")
    return memoryview(data)[offset:end]


def _block_entries(block: memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """The (key, value) entries of a block: keys share a prefix with the previous key; the restart
    array at the end (offsets where a key is stored whole) is only needed for seeking, not here."""
    if len(block) < 4:
        raise _Corrupt("a block too short for its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * restarts
    if restarts < 1 or limit < 0:
        raise _Corrupt(f"a block with an impossible restart count ({restarts})")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + length > limit:
            raise _Corrupt("a block entry runs past its block")
        key = key[:shared] + bytes(block[pos:pos + unshared])
        pos += unshared
        yield key, block[pos:pos + length]
        pos += length


def _table_entries(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """All (key, value) entries of an SSTable held in ``data``, in key order."""
    if len(data) < _FOOTER_SIZE or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise _Corrupt("no table footer (bad magic number): this is not a TensorFlow checkpoint index, "
                       "or it is truncated")
    footer = memoryview(data)[-_FOOTER_SIZE:-8]
    _, pos = _block_handle(footer)  # the metaindex block: empty in tensor bundles
    index_handle, _ = _block_handle(footer, pos)
    for _, handle in _block_entries(_read_block(data, index_handle)):
        yield from _block_entries(_read_block(data, _block_handle(handle)[0]))


def _parse_entry(name: str, buf: memoryview) -> TensorEntry:
    """A ``BundleEntryProto``: dtype=1, shape=2 (TensorShapeProto: dim=2 {size=1}), shard_id=3,
    offset=4, size=5, crc32c=6 (fixed32), slices=7."""
    scalars = {1: "dtype", 3: "shard", 4: "offset", 5: "size", 6: "crc32c"}
    f = dict.fromkeys(scalars.values(), 0)  # proto3 defaults: an absent field is 0
    shape, sliced = [], False
    for number, value in _fields(buf):
        if number in scalars:
            f[scalars[number]] = value
        elif number == 2:
            for n, dim in _fields(value):
                if n == 2:  # a Dim: size=1 (int64), name=2
                    size = next((v for k, v in _fields(dim) if k == 1), 0)
                    shape.append(size - (1 << 64) if size >= 1 << 63 else size)  # -1 would be unknown
        elif number == 7:
            sliced = True
    return TensorEntry(name, f["dtype"], tuple(shape), f["shard"], f["offset"], f["size"], f["crc32c"], sliced)


# --- files -----------------------------------------------------------------------------------------------------------

_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint prefix (``.../ckpt-N``) for a checkpoint folder (its ``checkpoint`` file names
    the latest), a ``ckpt-N.index`` or data file, or the prefix itself.

    Raises:
        FileNotFoundError: the path, the folder's ``checkpoint`` file or the index it names is missing.
        CheckpointError: the ``checkpoint`` file names no checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        state = path / "checkpoint"
        if not state.is_file():
            raise FileNotFoundError(f"{path} is a folder without a 'checkpoint' file: not a TensorFlow "
                                    "checkpoint folder (pass a ckpt-N.index file or ckpt-N prefix instead)")
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state.read_text(errors="replace"), re.M)
        if match is None:
            raise CheckpointError(f"{state} has no model_checkpoint_path line")
        named = path / match.group(1)  # usually relative to the folder (an absolute path stays as it is)
        # a folder copied from another machine may name an absolute path there: look for it here too
        prefix = next((p for p in (named, path / named.name) if Path(f"{p}.index").is_file()), named)
    elif path.suffix == ".index":
        prefix = path.with_suffix("")
    elif _DATA_SUFFIX.search(path.name):
        prefix = path.with_name(_DATA_SUFFIX.sub("", path.name))
    else:
        prefix = path
    if not Path(f"{prefix}.index").is_file():
        raise FileNotFoundError(f"no checkpoint index {prefix}.index" + (f" (named by {path}/checkpoint)"
                                                                          if path.is_dir() else ""))
    return prefix


def read_index(path: str | Path) -> tuple[Path, dict, dict[str, TensorEntry]]:
    """Decode a checkpoint's index (every block's checksum verified).

    Args:
        path: a checkpoint folder, a ``ckpt-N.index`` file or the ``ckpt-N`` prefix.

    Returns:
        ``(prefix, header, entries)``: header ``{"num_shards", "big_endian"}``; entries by tensor name.

    Raises:
        FileNotFoundError: missing files; CheckpointError: a foreign, truncated or damaged index.
    """
    prefix = resolve_checkpoint(path)
    index = Path(f"{prefix}.index")
    header, entries = {"num_shards": 1, "big_endian": False}, {}
    try:
        for key, value in _table_entries(index.read_bytes()):
            if key == b"":  # BundleHeaderProto: num_shards=1, endianness=2 (0 little, 1 big), version=3
                for number, v in _fields(value):
                    if number == 1:
                        header["num_shards"] = v
                    elif number == 2:
                        header["big_endian"] = v == 1
            else:
                name = key.decode("utf-8", errors="replace")
                entries[name] = _parse_entry(name, value)
    except _Corrupt as err:
        raise CheckpointError(f"{index}: {err}") from None
    return prefix, header, entries


def list_tf_checkpoint(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of a checkpoint -> ``(dtype, shape)``, reading only the index.

    dtype is a NumPy dtype name (``"float32"``) or, for types :func:`read_tf_checkpoint` does not
    decode, TensorFlow's (``"string"``). Names are the bundle's keys, e.g.
    ``model/layer_with_weights-0/g/.ATTRIBUTES/VARIABLE_VALUE``; optimizer slots contain ``/.OPTIMIZER_SLOT/``.
    """
    _, _, entries = read_index(path)
    return {name: (e.dtype, e.shape) for name, e in entries.items()}


def _unknown(name: str, entries: dict[str, TensorEntry], index: str) -> UnknownTensorError:
    close = difflib.get_close_matches(name, list(entries), n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else f"; it holds {len(entries)} tensors"
    return UnknownTensorError(f"{index} has no tensor {name!r}{hint}")


def read_tf_checkpoint(path: str | Path, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read tensors from a TensorFlow 2 checkpoint, checking each one's CRC-32C.

    Args:
        path: a checkpoint folder (the latest checkpoint its ``checkpoint`` file names), a
            ``ckpt-N.index`` file, or the ``ckpt-N`` prefix.
        names: the tensors to read (bundle keys, see :func:`list_tf_checkpoint`; one name or several); None reads every
            tensor of a decodable dtype (strings, such as the object graph, and partitioned variables
            are skipped).

    Returns:
        name -> a writable NumPy array of the stored dtype and shape (native byte order).

    Raises:
        FileNotFoundError: a missing folder, ``checkpoint`` file, index or data shard.
        UnknownTensorError: a name the checkpoint does not hold (a ``KeyError``; lists close names).
        CheckpointError: a foreign or damaged index, a truncated shard, a tensor whose bytes fail their
            checksum, or a tensor asked for by name whose dtype or slicing this reader does not support.
    """
    prefix, header, entries = read_index(path)
    if isinstance(names, str):  # one name, not its characters
        names = [names]
    if names is None:
        wanted = [e for e in entries.values() if e.readable]
    else:
        wanted = []
        for name in dict.fromkeys(names):
            if name not in entries:
                raise _unknown(name, entries, f"{prefix}.index")
            entry = entries[name]
            if not entry.readable:
                why = "is a partitioned (sliced) variable" if entry.sliced else f"has dtype {entry.dtype}"
                raise CheckpointError(f"{prefix}.index: tensor {name!r} {why}, which this reader does not decode")
            wanted.append(entry)
    out = {}
    for shard in sorted({e.shard for e in wanted}):
        out.update(_read_shard(prefix, header, shard, [e for e in wanted if e.shard == shard]))
    return {e.name: out[e.name] for e in wanted}


def _read_shard(prefix: Path, header: dict, shard: int, entries: list[TensorEntry]) -> dict[str, np.ndarray]:
    """Read ``entries`` from data shard ``shard``, in file order (one forward pass)."""
    data = Path(f"{prefix}.data-{shard:05d}-of-{header['num_shards']:05d}")
    if not data.is_file():
        raise FileNotFoundError(f"missing data shard {data} (named by {prefix}.index)")
    length = data.stat().st_size
    out = {}
    with open(data, "rb") as f:
        for e in sorted(entries, key=lambda e: e.offset):
            dtype = np.dtype(_DTYPES[e.dtype_code])
            count = int(np.prod(e.shape, dtype=np.int64))
            if min(e.shape, default=0) < 0 or count * dtype.itemsize != e.size:
                raise CheckpointError(f"{prefix}.index: tensor {e.name!r} of shape {e.shape} and dtype {dtype} "
                                      f"cannot take {e.size} bytes")
            if e.offset + e.size > length:
                raise CheckpointError(f"{data}: truncated ({length} bytes; tensor {e.name!r} ends at "
                                      f"{e.offset + e.size})")
            raw = bytearray(e.size)
            f.seek(e.offset)
            f.readinto(raw)
            if _masked_crc(raw) != e.crc32c:
                raise CheckpointError(f"{data}: tensor {e.name!r} (bytes {e.offset}-{e.offset + e.size}) fails its "
                                      "checksum: the file is damaged")
            array = np.frombuffer(raw, dtype.newbyteorder(">") if header["big_endian"] else dtype)
            out[e.name] = array.astype(dtype, copy=False).reshape(e.shape)
    return out
