"""Model files: round trip, atomic writes, and refusal of truncated, corrupt or foreign files."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import xpnet


@pytest.fixture
def trained(rng):
    model = xpnet.MLP([8, 6, 3], seed=0)
    X = rng.normal(size=(40, 8)).astype(np.float32)
    model.fit(X, rng.integers(0, 3, size=40), epochs=2, verbose=0)
    return model, X


def test_save_load_gives_identical_predictions(tmp_path, trained):
    model, X = trained
    path = tmp_path / "model.safetensors"
    model.save(path)
    loaded = xpnet.load(path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    for (W, b), (W2, b2) in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_float64_models_keep_their_dtype(tmp_path, rng):
    model = xpnet.MLP([4, 3], dtype="float64", seed=1)
    model.save(tmp_path / "m")
    loaded = xpnet.load(tmp_path / "m")
    assert loaded.dtype == "float64"
    assert loaded.get_weights()[0][0].dtype == np.float64


def test_a_failed_save_leaves_the_old_file_intact(tmp_path, trained, monkeypatch):
    model, _ = trained
    path = tmp_path / "model.safetensors"
    model.save(path)
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        xpnet.MLP([8, 6, 3], seed=5).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_truncated_files_are_refused(tmp_path, trained):
    model, _ = trained
    path = tmp_path / "model.safetensors"
    model.save(path)
    data = path.read_bytes()
    for cut in (0, 5, 8, 40, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}"
        broken.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable xpnet model file"):
            xpnet.load(broken)


def test_corrupt_header_is_refused(tmp_path, trained):
    model, _ = trained
    path = tmp_path / "model.safetensors"
    model.save(path)
    data = bytearray(path.read_bytes())
    data[10:20] = b"@@@@@@@@@@"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a readable xpnet model file"):
        xpnet.load(path)


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": np.ones((2, 2), dtype=np.float32)}, str(path))
    with pytest.raises(ValueError, match="format='xpnet.model'"):
        xpnet.load(path)


def test_tensors_that_do_not_match_the_config_are_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "lying.safetensors"
    config = {"layers": [4, 3], "activation": "relu", "init": "he", "dtype": "float32", "seed": 0}
    metadata = {"format": "xpnet.mlp", "format_version": "1", "xpnet_version": "0", "config": json.dumps(config)}
    save_file({"layers.0.W": np.ones((5, 3), dtype=np.float32), "layers.0.b": np.ones(3, dtype=np.float32)},
              str(path), metadata=metadata)
    with pytest.raises(ValueError, match="layer 0 needs W"):
        xpnet.load(path)


class _Exploit:
    """Unpickling this would create a marker file: loading must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(ValueError, match="not a readable xpnet model file"):
        xpnet.load(path)
    assert not marker.exists()


def test_save_never_replaces_a_special_file(tmp_path, trained):
    """As root, a rename onto /dev/... would replace the device node: a save writes regular files only."""
    import stat

    model, _ = trained
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    for target in (fifo, link):
        with pytest.raises(ValueError, match="not a regular file"):
            model.save(target)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link"]  # and no temp file left


def test_weights_that_are_not_numbers_are_never_saved(tmp_path, trained):
    model, _ = trained
    model.layers[1].b[1] = np.nan
    with pytest.raises(ValueError, match=r"cannot save .*m\.safetensors: tensor 'layers\.1\.b' holds NaN"):
        model.save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_save_leaves_no_temp_file(tmp_path, trained, monkeypatch):
    model, _ = trained

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_to_a_folder_or_missing_folder_is_a_clear_error(tmp_path, trained):
    model, _ = trained
    with pytest.raises(IsADirectoryError, match="is a folder"):
        model.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.save(tmp_path / "nope" / "m.safetensors")


# --- the file format: pinned, and read back from earlier releases ---------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_model_file_from_xpnet_0_1_still_loads_with_the_same_predictions():
    expected = json.loads((FIXTURES / "mlp-0.1.0.json").read_text())
    model = xpnet.load(FIXTURES / "mlp-0.1.0.safetensors")
    assert type(model) is xpnet.MLP and model.widths == [12, 7, 5, 3] and model.activation == "tanh"
    np.testing.assert_allclose(model.predict_proba(np.array(expected["X"])), expected["proba"], rtol=1e-6)


def test_the_on_disk_layout_is_pinned(tmp_path):
    """What other tools and later releases read: change it only with a new format version."""
    from xpnet.layers import Conv2D, Dense, Flatten, MaxPool2D

    model = xpnet.Sequential([Conv2D(2, 3, activation="relu"), MaxPool2D(2), Flatten(), Dense(3)],
                             input_shape=(6, 6, 1), dtype="float32", seed=0)
    path = tmp_path / "m.safetensors"
    model.save(path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert meta["format"] == "xpnet.model" and meta["format_version"] == "2"
    assert json.loads(meta["config"]) == {
        "class": "Sequential", "input_shape": [6, 6, 1], "dtype": "float32", "seed": 0,
        "layers": [
            {"type": "Conv2D", "filters": 2, "kernel_size": [3, 3], "strides": [1, 1], "padding": "valid",
             "activation": "relu", "init": "he"},
            {"type": "MaxPool2D", "pool_size": [2, 2], "strides": [2, 2]},
            {"type": "Flatten"},
            {"type": "Dense", "units": 3, "activation": None, "init": "he"},
        ],
    }
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {
        "layers.0.W": ("F32", [3, 3, 1, 2]), "layers.0.b": ("F32", [2]),
        "layers.3.W": ("F32", [8, 3]), "layers.3.b": ("F32", [3]),
    }
    start = 8 + n + header["layers.0.W"]["data_offsets"][0]
    np.testing.assert_array_equal(np.frombuffer(data[start : start + 72], "<f4").reshape(3, 3, 1, 2),
                                  model.get_weights()[0])
    mlp = xpnet.MLP([4, 3], seed=0)
    mlp.save(path)
    config = json.loads(json.loads(path.read_bytes()[8:][: int.from_bytes(path.read_bytes()[:8], "little")])
                        ["__metadata__"]["config"])
    assert config == {"class": "MLP", "layers": [4, 3], "activation": "relu", "init": "he", "dtype": "float32", "seed": 0}


def _write_raw(path, tensors, config, fmt="xpnet.model", version="2"):
    from safetensors.numpy import save_file

    metadata = {"format": fmt, "format_version": version, "xpnet_version": "0", "config": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)


def test_unknown_layer_types_wrong_dtypes_and_special_files_are_refused(tmp_path):
    config = {"class": "Sequential", "input_shape": [4], "dtype": "float32", "seed": 0,
              "layers": [{"type": "Teleport", "units": 3}]}
    _write_raw(tmp_path / "a", {"layers.0.W": np.ones((4, 3), np.float32)}, config)
    with pytest.raises(ValueError, match="unknown type 'Teleport'"):
        xpnet.load(tmp_path / "a")
    config["layers"] = [{"type": "Dense", "units": 3, "activation": None, "init": "he"}]
    _write_raw(tmp_path / "b", {"layers.0.W": np.ones((4, 3), np.float64), "layers.0.b": np.ones(3, np.float64)}, config)
    with pytest.raises(ValueError, match="float64, the model is float32"):
        xpnet.load(tmp_path / "b")
    _write_raw(tmp_path / "c", {"layers.0.W": np.ones((4, 3), np.int32), "layers.0.b": np.ones(3, np.int32)}, config)
    with pytest.raises(ValueError, match="dtype 'I32'"):
        xpnet.load(tmp_path / "c")
    with pytest.raises(ValueError, match="not a regular file"):
        xpnet.load(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):  # never opened: no hang
        xpnet.load(fifo)
    deep = tmp_path / "deep"
    header = b"[" * 100_000 + b"]" * 100_000
    deep.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="not a readable xpnet model file"):
        xpnet.load(deep)
    with pytest.raises(FileNotFoundError):
        xpnet.load(tmp_path / "missing")


def test_a_flipped_bit_in_the_weights_is_caught(tmp_path, trained):
    path = tmp_path / "m.safetensors"
    trained[0].save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"m\.safetensors .*do not match the checksum saved with them"):
        xpnet.load(path)


def test_the_checksum_covers_names_shapes_and_values():
    from xpnet.io import tensors_sha256

    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(2, np.float32)}
    same = tensors_sha256({"y": np.ones(2, np.float32), "x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    assert tensors_sha256(a) == same  # order of the dict does not matter
    for other in ({"x": a["x"].reshape(3, 2), "y": a["y"]}, {"x": a["x"], "z": a["y"]},
                  {"x": a["x"].astype(np.float64), "y": a["y"]}, {"x": a["x"] + 1e-6, "y": a["y"]}):
        assert tensors_sha256(other) != same
    big_endian = {"x": a["x"].astype(">f4"), "y": a["y"]}
    assert tensors_sha256(big_endian) == same  # the digest is of the bytes as stored: little-endian


def test_a_config_claiming_layers_larger_than_its_tensors_allocates_nothing_big(tmp_path):
    """A few-KB file whose config claims a 784-10**8-10 MLP fails before allocating it."""
    import tracemalloc

    config = {"class": "MLP", "layers": [784, 10**8, 10], "activation": "relu", "init": "he",
              "dtype": "float32", "seed": 0}
    _write_raw(tmp_path / "liar", {"layers.0.W": np.ones((784, 3), np.float32), "layers.0.b": np.ones(3, np.float32),
                                   "layers.1.W": np.ones((3, 10), np.float32), "layers.1.b": np.ones(10, np.float32)},
               config)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="liar .*need more weights than the file holds"):
            xpnet.load(tmp_path / "liar")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"loading the lying file allocated {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("version, config, tensors, message", [
    ("3", {"class": "Sequential"}, {}, "xpnet.model version '3'; this xpnet reads '2'"),
    ("2", [1, 2], {}, "its config is not a JSON object"),
    ("2", {"class": "Pipeline", "dtype": "float32"}, {}, "unknown model class 'Pipeline'"),
    ("2", {"class": "Sequential", "input_shape": [4], "dtype": "float32", "seed": 0,
           "layers": [{"type": "Dense", "units": 3, "activation": None, "init": "he"}]},
     {"layers.0.W": np.ones((4, 3), np.float32), "layers.7.b": np.ones(3, np.float32)},
     r"tensors \['layers.0.W', 'layers.7.b'\] do not match the layers' parameters"),
])
def test_files_that_describe_another_model_are_refused(tmp_path, version, config, tensors, message):
    _write_raw(tmp_path / "m", tensors or {"x": np.ones(1, np.float32)}, config, version=version)
    with pytest.raises(ValueError, match=message):
        xpnet.load(tmp_path / "m")


def test_a_checkpoint_keeps_0d_step_counts_and_is_not_a_model(tmp_path):
    from xpnet.io import CHECKPOINT_FORMATS, read_model_file, write_model_file

    path = tmp_path / "checkpoint.safetensors"
    write_model_file(path, {"optimizer.0.t": np.asarray(7, dtype=np.int64)}, {"format": "xpnet.checkpoint"})
    tensors, _ = read_model_file(path, formats=CHECKPOINT_FORMATS)
    assert tensors["optimizer.0.t"].shape == () and int(tensors["optimizer.0.t"]) == 7
    with pytest.raises(ValueError, match="its metadata does not say format='xpnet.model'"):
        xpnet.load(path)


# --- read_model_file: what it accepts, and the reason it gives for what it refuses --------------

META = {"format": "xpnet.model"}


@pytest.mark.parametrize("tensors", [{}, {"a": np.arange(3, dtype=np.float32), "b": np.ones((2, 2))}])
def test_files_round_trip_and_bytes_after_the_tensors_are_not_read(tmp_path, tensors):
    from xpnet.io import read_model_file, write_model_file

    path = tmp_path / "m"
    write_model_file(path, tensors, META)
    path.write_bytes(path.read_bytes() + b"junk")  # e.g. padding added in transfer
    got, metadata = read_model_file(path)
    assert got.keys() == tensors.keys() and metadata["format"] == "xpnet.model"
    for name, a in tensors.items():
        assert got[name].dtype == a.dtype
        np.testing.assert_array_equal(got[name], a)


def _raw_file(path, header, data=b""):
    """A file in safetensors' layout with any header: 8 bytes of length, JSON, data."""
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


def _tensor(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, data, why", [
    ([META], b"", "its header is not a JSON object"),
    ({"__metadata__": {"format": "safetensors"}}, b"", "its metadata does not say format='xpnet.model'"),
    ({"__metadata__": META, "a": [0, 4]}, b"\0" * 4, "tensor 'a' is not described by dtype, shape and data_offsets"),
    ({"__metadata__": META, "a": {**_tensor(), "extra": 1}}, b"\0" * 4,
     "tensor 'a' is not described by dtype, shape and data_offsets"),
    ({"__metadata__": META, "a": _tensor(dtype="I32")}, b"\0" * 4,
     "tensor 'a' has dtype 'I32'; xpnet writes F32, F64 or I64 only"),
    ({"__metadata__": META, "a": _tensor(shape=[-1])}, b"\0" * 4, "tensor 'a' has shape [-1]"),
    ({"__metadata__": META, "a": _tensor(shape=[0.5])}, b"\0" * 4, "tensor 'a' has shape [0.5]"),
    ({"__metadata__": META, "a": _tensor(offsets=[0])}, b"\0" * 4, "tensor 'a' has data_offsets [0]"),
    ({"__metadata__": META, "a": _tensor(offsets=[0, 4.0])}, b"\0" * 4, "tensor 'a' has data_offsets [0, 4.0]"),
    ({"__metadata__": META, "a": _tensor(offsets=[-4, 0])}, b"\0" * 4,
     "tensor 'a' claims bytes [-4, 0] that the file does not hold"),
    ({"__metadata__": META, "a": _tensor(offsets=[0, 8])}, b"\0" * 8,
     "tensor 'a' claims bytes [0, 8] that the file does not hold"),
    ({"__metadata__": META, "a": _tensor()}, b"\0" * 3,  # truncated in the data
     "tensor 'a' claims bytes [0, 4] that the file does not hold"),
    ({"__metadata__": META, "a": _tensor(offsets=[4, 8])}, b"\0" * 8,  # a gap safetensors refuses
     "SafetensorError: Error while deserializing: invalid offset for tensor `a`"),
])
def test_each_malformed_header_is_refused_naming_the_file_and_the_fault(tmp_path, header, data, why):
    from xpnet.io import read_model_file

    path = _raw_file(tmp_path / "m", header, data)
    with pytest.raises(ValueError) as info:
        read_model_file(path)
    assert str(info.value) == f"{path} is not a readable xpnet model file: {why}"


def test_a_file_cut_short_is_refused_naming_the_fault(tmp_path):
    from xpnet.io import read_model_file

    path = tmp_path / "m"
    path.write_bytes(b"\1\0\0")
    with pytest.raises(ValueError, match=r"m is not a readable xpnet model file: only 3 bytes$"):
        read_model_file(path)
    _raw_file(path, {"__metadata__": META})
    path.write_bytes(path.read_bytes()[:-1])  # the header's last byte is missing
    with pytest.raises(ValueError) as info:
        read_model_file(path)
    assert str(info.value) == (f"{path} is not a readable xpnet model file: its header length runs past the end "
                               "of the file or over 1 MB (truncated, or not safetensors)")
    path.write_bytes((4).to_bytes(8, "little") + b"{]}}")
    with pytest.raises(ValueError) as info:
        read_model_file(path)
    assert str(info.value) == f"{path} is not a readable xpnet model file: its header is not JSON (JSONDecodeError)"


def test_refusals_of_special_and_damaged_files_name_the_file(tmp_path, trained):
    from xpnet.io import read_model_file

    with pytest.raises(ValueError) as info:
        read_model_file(tmp_path)
    assert str(info.value) == f"{tmp_path} is not a readable xpnet model file: it is not a regular file"
    path = tmp_path / "m"
    trained[0].save(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        read_model_file(path)
    assert str(info.value) == (f"{path} is not a readable xpnet model file: its weights do not match the checksum "
                               "saved with them (the file is damaged)")


def test_saving_to_a_folder_suggests_a_file_name(tmp_path, trained):
    with pytest.raises(IsADirectoryError, match=f"give a file name such as {tmp_path / 'model.safetensors'}$"):
        trained[0].save(tmp_path)
