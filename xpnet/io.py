"""Model files: tensors in safetensors, the model's description as JSON in its metadata.

This module knows the file, not the model: ``write_model_file`` and ``read_model_file`` move a
dict of named NumPy arrays and a dict of metadata strings to and from disk. ``xpnet.load``
(in ``xpnet.model``) turns them back into a model through the registry of layer classes.

Reading parses a fixed binary layout (8 bytes of header length, a JSON header, then raw
little-endian arrays) and never runs code from the file: no pickle anywhere. The header is
checked (size, structure, dtypes, offsets) before anything proportional to what it claims is
read or allocated, and only the bytes it describes are read. A SHA-256 of the tensors, kept in
the metadata, catches damaged weights (a flipped bit) that would otherwise load silently.
Writing goes through a temporary file and a rename (``xpnet.files``), so an interrupted save
never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes, check_file_target

__all__ = ["write_model_file", "read_model_file", "tensors_sha256", "FORMATS", "CHECKPOINT_FORMATS"]

#: format name -> the version this xpnet writes or still reads
FORMATS = {"xpnet.model": "2", "xpnet.mlp": "1"}
#: a run's checkpoint (``xpnet.runs``): optimizer state and step counts beside a model file
CHECKPOINT_FORMATS = {"xpnet.checkpoint": "1"}
CHECKSUM = "tensors_sha256"  # metadata key; files of xpnet 0.1 have none
MAX_HEADER_BYTES = 1 << 20  # a model's header is a few KB; more is not a model file
_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8")}  # I64: step counts


def _not_a_model(path, why):
    return ValueError(f"{path} is not a readable xpnet model file: {why}")


def write_model_file(path, tensors: dict, metadata: dict) -> None:
    """Write named float arrays and string metadata to ``path`` (safetensors), atomically."""
    from safetensors.numpy import save as to_bytes

    path = check_file_target(path, "model.safetensors")
    arrays = {name: np.asarray(a, order="C") for name, a in tensors.items()}  # 0-d stays 0-d
    metadata = {**metadata, CHECKSUM: tensors_sha256(arrays)}
    atomic_write_bytes(path, to_bytes(arrays, metadata=metadata))


def tensors_sha256(tensors: dict) -> str:
    """A digest of named arrays: each name, dtype, shape and little-endian bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        a = np.asarray(tensors[name], order="C")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        digest.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def _check_header(path, header, data_bytes, formats):
    """Validate the parsed JSON header against the bytes the file has; return the data length."""
    if not isinstance(header, dict):
        raise _not_a_model(path, "its header is not a JSON object")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        metadata = {}
    if formats.get(metadata.get("format")) is None:
        raise _not_a_model(path, f"its metadata does not say format={next(iter(formats))!r}")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _not_a_model(path, f"tensor {name!r} is not described by dtype, shape and data_offsets")
        if entry["dtype"] not in _DTYPES:
            raise _not_a_model(path, f"tensor {name!r} has dtype {entry['dtype']!r}; xpnet writes F32, F64 or I64 only")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _not_a_model(path, f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _not_a_model(path, f"tensor {name!r} has data_offsets {offsets!r}")
        size = math.prod(shape) * _DTYPES[entry["dtype"]].itemsize
        if offsets[0] < 0 or offsets[1] - offsets[0] != size or offsets[1] > data_bytes:
            raise _not_a_model(path, f"tensor {name!r} claims bytes {offsets} that the file does not hold")
        end = max(end, offsets[1])
    return end


def read_model_file(path, *, formats=FORMATS) -> tuple[dict, dict]:
    """Read ``(tensors, metadata)`` from a model file written by ``write_model_file`` (or a
    checkpoint, with ``formats=CHECKPOINT_FORMATS``: the metadata's format must be one of ``formats``).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a regular file, or a truncated, corrupt or foreign file (a pickle, another
        program's safetensors, ...); the message names the file and what is wrong.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load as from_bytes

    path = Path(path)
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise _not_a_model(path, "it is not a regular file")
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _not_a_model(path, f"only {len(prefix)} bytes")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(info.st_size - 8, MAX_HEADER_BYTES):
            raise _not_a_model(path, "its header length runs past the end of the file or over 1 MB "
                                     "(truncated, or not safetensors)")
        header_bytes = f.read(header_len)
        try:
            header = json.loads(header_bytes)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise _not_a_model(path, f"its header is not JSON ({type(exc).__name__})") from None
        data_len = _check_header(path, header, info.st_size - 8 - header_len, formats)
        data = f.read(data_len)
    try:
        tensors = from_bytes(prefix + header_bytes + data)
    except (SafetensorError, ValueError) as exc:
        raise _not_a_model(path, f"{type(exc).__name__}: {exc}") from None
    metadata = header["__metadata__"]
    if CHECKSUM in metadata and tensors_sha256(tensors) != metadata[CHECKSUM]:
        raise _not_a_model(path, "its weights do not match the checksum saved with them (the file is damaged)")
    return tensors, metadata
