"""Model files: weights in safetensors, the model's config as JSON in its metadata.

Loading parses a fixed binary layout (a JSON header, then raw little-endian arrays) and never
runs code from the file: no pickle anywhere. Saving writes a temporary file beside the target
and renames it into place, so an interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["save", "load", "atomic_write_bytes"]

FORMAT = "xpnet.mlp"
FORMAT_VERSION = "1"


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it owner-only; a saved model is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model, path) -> None:
    """Save ``model``'s weights and config to ``path`` (a safetensors file), atomically."""
    from safetensors.numpy import save as to_bytes

    from . import __version__

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'model.safetensors'}")
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    tensors = {}
    for i, (W, b) in enumerate(model.get_weights()):
        tensors[f"layers.{i}.W"] = np.ascontiguousarray(W)
        tensors[f"layers.{i}.b"] = np.ascontiguousarray(b)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "xpnet_version": __version__,
        "config": json.dumps(model.config),
    }
    atomic_write_bytes(path, to_bytes(tensors, metadata=metadata))


def _not_a_model(path, why):
    return ValueError(f"{path} is not a readable xpnet model file: {why}")


def load(path, *, backend=None):
    """Load a model saved by ``MLP.save``; ``backend`` picks where it runs (default: current).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A truncated, corrupt or foreign file (a pickle, another program's safetensors, ...).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load as from_bytes

    from .model import MLP

    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise _not_a_model(path, f"only {len(data)} bytes")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise _not_a_model(path, "its header runs past the end of the file (truncated, or not safetensors)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = from_bytes(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise _not_a_model(path, f"{type(exc).__name__}: {exc}") from None
    metadata = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
    if metadata.get("format") != FORMAT:
        raise _not_a_model(path, f"its metadata does not say format={FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _not_a_model(path, f"format version {metadata.get('format_version')!r}, this xpnet reads {FORMAT_VERSION!r}")
    try:
        config = json.loads(metadata["config"])
        model = MLP(
            config["layers"],
            activation=config["activation"],
            init=config["init"],
            dtype=config["dtype"],
            seed=config["seed"],
            backend=backend,
        )
        n_layers = len(model.layers)
        expected = {f"layers.{i}.{p}" for i in range(n_layers) for p in "Wb"}
        if set(tensors) != expected:
            raise ValueError(f"tensors {sorted(tensors)} do not match the config's {n_layers} layers")
        model.set_weights([(tensors[f"layers.{i}.W"], tensors[f"layers.{i}.b"]) for i in range(n_layers)])
    except (KeyError, TypeError, ValueError) as exc:
        raise _not_a_model(path, f"{type(exc).__name__}: {exc}") from None
    return model
