"""MNIST from IDX files (local and downloaded from a server on 127.0.0.1) and seed 000's CSV."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from xpnet import datasets
from xpnet.datasets import MnistUnavailableError, dataset_hashes, load_csv, load_mnist

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("XPNET_DATA") or REPO.parent / "shared" / "data")
MNIST = DATA / "mnist"
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

needs_mnist = pytest.mark.skipif(
    not all((MNIST / f"{name}.gz").is_file() for name in datasets.SHA256),
    reason=f"real MNIST not found in {MNIST} (set XPNET_DATA to a folder holding mnist/)",
)


def raw(name: str) -> bytes:
    """The decompressed IDX bytes of one real MNIST file."""
    return gzip.decompress((MNIST / f"{name}.gz").read_bytes())


@pytest.fixture
def no_mirrors(monkeypatch):
    """Make sure no test reaches the internet by accident."""
    monkeypatch.setenv("XPNET_MNIST_MIRRORS", "http://127.0.0.1:9/")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# -- the real files ----------------------------------------------------------------------------


@needs_mnist
@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_real_mnist_shapes_dtypes_and_labels(split, n):
    X, y = load_mnist(split, root=MNIST, download=False)
    assert X.shape == (n, 28, 28) and X.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.uint8
    assert set(np.unique(y)) == set(range(10))
    assert X.max() == 255 and X.min() == 0
    # every digit is an image with ink in it, not a blank
    assert (X.reshape(n, -1).max(axis=1) > 0).all()
    # the published label counts of the first items: MNIST's test set starts 7, 2, 1, 0, 4
    if split == "test":
        assert y[:5].tolist() == [7, 2, 1, 0, 4]
    else:
        assert y[:5].tolist() == [5, 0, 4, 1, 9]


@needs_mnist
def test_xpnet_data_env_sets_the_default_root(monkeypatch, no_mirrors):
    monkeypatch.setenv("XPNET_DATA", str(DATA))
    X, y = load_mnist("test")
    X2, y2 = load_mnist("test", root=MNIST)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)


def test_default_root_without_xpnet_data_is_the_user_cache(monkeypatch):
    import pooch

    monkeypatch.delenv("XPNET_DATA", raising=False)
    assert datasets._resolve_root(None) == Path(pooch.os_cache("xpnet")) / "mnist"


@needs_mnist
def test_returned_arrays_are_private_copies():
    X, y = load_mnist("test", root=MNIST, download=False)
    assert X.flags.writeable and y.flags.writeable
    first = int(X[0, 10, 10]) + 1
    X[0] = 0
    y[0] = 3
    X2, y2 = load_mnist("test", root=MNIST, download=False)
    assert int(X2[0, 10, 10]) + 1 == first and X2[0].any()
    assert y2[0] == 7


@needs_mnist
def test_raw_idx_files_load_like_the_gzip_files(tmp_path):
    for name in TEST_FILES:
        (tmp_path / name).write_bytes(raw(name))
    X, y = load_mnist("test", root=tmp_path, download=False)
    Xg, yg = load_mnist("test", root=MNIST, download=False)
    np.testing.assert_array_equal(X, Xg)
    np.testing.assert_array_equal(y, yg)


def test_dataset_hashes():
    assert dataset_hashes() == datasets.SHA256
    assert set(dataset_hashes("test")) == set(TEST_FILES)
    assert dataset_hashes("train")["train-images-idx3-ubyte"].startswith("ba891046")
    with pytest.raises(ValueError, match="'valid'"):
        dataset_hashes("valid")


@pytest.mark.parametrize("split", ["valid", "Train", "", None, ["test"]])
def test_unknown_split_is_refused(split, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"got {split!r}")):
        load_mnist(split, root=tmp_path, download=False)


def test_import_does_not_pull_in_pooch_or_requests():
    code = "import sys, xpnet.datasets; print(sorted({'pooch', 'requests'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


# -- bad files are refused ---------------------------------------------------------------------


def _labels_file(tmp_path, data: bytes, *, compress: bool):
    """Put the real t10k images next to a given labels file; return the root."""
    shutil.copy(MNIST / "t10k-images-idx3-ubyte.gz", tmp_path)
    name = "t10k-labels-idx1-ubyte"
    if compress:
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
    else:
        (tmp_path / name).write_bytes(data)
    return tmp_path


@needs_mnist
def test_truncated_gzip_is_refused(tmp_path):
    gz = (MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    shutil.copy(MNIST / "t10k-labels-idx1-ubyte.gz", tmp_path)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*not a complete gzip"):
        load_mnist("test", root=tmp_path, download=False)


@needs_mnist
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_truncated_idx_payload_is_refused(tmp_path, compress):
    data = raw("t10k-labels-idx1-ubyte")
    _labels_file(tmp_path, data[:-100], compress=compress)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.*truncated.*10000 items"):
        load_mnist("test", root=tmp_path, download=False)


@needs_mnist
def test_file_shorter_than_its_header_is_refused(tmp_path):
    _labels_file(tmp_path, raw("t10k-labels-idx1-ubyte")[:6], compress=False)
    with pytest.raises(ValueError, match="shorter than its 8-byte header"):
        load_mnist("test", root=tmp_path, download=False)


@needs_mnist
def test_trailing_bytes_are_refused(tmp_path):
    _labels_file(tmp_path, raw("t10k-labels-idx1-ubyte") + b"\x01", compress=True)
    with pytest.raises(ValueError, match="trailing bytes"):
        load_mnist("test", root=tmp_path, download=False)


@needs_mnist
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_wrong_hash_is_refused(tmp_path, compress):
    data = bytearray(raw("t10k-labels-idx1-ubyte"))
    data[8] = (data[8] + 1) % 10  # a well-formed IDX file with one label changed
    _labels_file(tmp_path, bytes(data), compress=compress)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.*sha256.*ff7bcfd4"):
        load_mnist("test", root=tmp_path, download=False)


@needs_mnist
def test_wrong_magic_is_refused(tmp_path):
    data = bytearray(raw("t10k-labels-idx1-ubyte"))
    data[3] = 0x03  # an images magic where labels belong
    _labels_file(tmp_path, bytes(data), compress=False)
    with pytest.raises(ValueError, match=r"magic number 0x00000803.*0x00000801"):
        load_mnist("test", root=tmp_path, download=False)


@needs_mnist
def test_wrong_image_size_is_refused(tmp_path):
    data = bytearray(raw("t10k-images-idx3-ubyte"))
    data[8:12] = (27).to_bytes(4, "big")  # rows = 27
    data = data[: 16 + 10000 * 27 * 28]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes(data))
    shutil.copy(MNIST / "t10k-labels-idx1-ubyte.gz", tmp_path)
    with pytest.raises(ValueError, match="27x28, expected 28x28"):
        load_mnist("test", root=tmp_path, download=False)


@needs_mnist
def test_replaced_file_is_read_again_not_served_from_cache(tmp_path):
    for name in TEST_FILES:
        shutil.copy(MNIST / f"{name}.gz", tmp_path)
    load_mnist("test", root=tmp_path, download=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(raw("t10k-labels-idx1-ubyte"))
    data[8] = (data[8] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(data)))
    os.utime(labels, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    with pytest.raises(ValueError, match="sha256"):
        load_mnist("test", root=tmp_path, download=False)


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    with pytest.raises(MnistUnavailableError) as info:
        load_mnist("test", root=tmp_path, download=False)
    message = str(info.value)
    assert isinstance(info.value, OSError)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert str(tmp_path) in message and "XPNET_DATA" in message and "download=False" in message


# -- downloads from a server on 127.0.0.1 ------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(no_mirrors):
    """serve(folder) -> base URL of an HTTP server on 127.0.0.1 serving that folder."""
    servers = []

    def start(folder):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/mnist/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _site(tmp_path, files: dict) -> Path:
    """A folder to serve: ``<site>/mnist/<name>.gz`` for each (name, bytes) given."""
    site = tmp_path / "site"
    (site / "mnist").mkdir(parents=True)
    for name, data in files.items():
        (site / "mnist" / f"{name}.gz").write_bytes(data)
    return site


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


@needs_mnist
def test_download_from_a_mirror(tmp_path, serve):
    url = serve(_site(tmp_path, {n: (MNIST / f"{n}.gz").read_bytes() for n in TEST_FILES}))
    root = tmp_path / "new" / "mnist"  # does not exist yet
    X, y = load_mnist("test", root=root, mirrors=[url], progressbar=False)
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{n}.gz" for n in TEST_FILES)
    Xr, yr = load_mnist("test", root=MNIST, download=False)
    np.testing.assert_array_equal(X, Xr)
    np.testing.assert_array_equal(y, yr)


@needs_mnist
def test_download_falls_back_to_the_next_mirror_and_reads_the_env(tmp_path, serve, monkeypatch):
    url = serve(_site(tmp_path, {n: (MNIST / f"{n}.gz").read_bytes() for n in TEST_FILES}))
    monkeypatch.setenv("XPNET_MNIST_MIRRORS", f"{_closed_port_url()}, {url}")
    root = tmp_path / "root"
    X, y = load_mnist("test", root=root)  # with the progress bar
    assert X.shape == (10_000, 28, 28) and y[:3].tolist() == [7, 2, 1]
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{n}.gz" for n in TEST_FILES)


@needs_mnist
def test_download_only_fetches_what_is_missing(tmp_path, serve):
    # The server has only the labels; the images are already in root.
    url = serve(_site(tmp_path, {TEST_FILES[1]: (MNIST / f"{TEST_FILES[1]}.gz").read_bytes()}))
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(MNIST / f"{TEST_FILES[0]}.gz", root)
    X, y = load_mnist("test", root=root, mirrors=[url], progressbar=False)
    assert len(X) == len(y) == 10_000


@needs_mnist
@pytest.mark.parametrize("damage", ["wrong-hash", "truncated"])
def test_corrupt_download_is_refused_and_removed(tmp_path, serve, damage):
    images = (MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()
    if damage == "wrong-hash":
        data = bytearray(gzip.decompress(images))
        data[16 + 28 * 14 + 14] ^= 0xFF
        images = gzip.compress(bytes(data), compresslevel=1)
    else:
        images = images[: len(images) - 5000]
    labels = (MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()
    url = serve(_site(tmp_path, {TEST_FILES[0]: images, TEST_FILES[1]: labels}))
    root = tmp_path / "root"
    with pytest.raises(MnistUnavailableError) as info:
        load_mnist("test", root=root, mirrors=[url], progressbar=False)
    message = str(info.value)
    assert url in message and "t10k-images-idx3-ubyte" in message
    assert ("sha256" if damage == "wrong-hash" else "not a complete gzip") in message
    # nothing bad, and no half-written temp file, is left behind
    assert not (root / "t10k-images-idx3-ubyte.gz").exists()
    assert not [p for p in root.iterdir() if p.name.endswith(".part")]


@needs_mnist
def test_missing_on_the_server_is_a_clear_error(tmp_path, serve):
    url = serve(_site(tmp_path, {}))
    with pytest.raises(MnistUnavailableError, match="404"):
        load_mnist("test", root=tmp_path / "root", mirrors=[url], progressbar=False)


def test_unreachable_mirror_gives_the_offline_error(tmp_path, no_mirrors):
    url = _closed_port_url()
    root = tmp_path / "root"
    with pytest.raises(MnistUnavailableError) as info:
        load_mnist("train", root=root, mirrors=[url], progressbar=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "train-labels-idx1-ubyte.gz" in message
    assert url in message and str(root) in message and "XPNET_DATA" in message
    assert list(root.iterdir()) == []


def test_empty_mirror_list_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        load_mnist("test", root=tmp_path, mirrors=[])


# -- seed 000's CSV ----------------------------------------------------------------------------

HEADER = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))


def _write_csv(path, X, y, *, newline="\n", header=HEADER):
    rows = [header] + [f"{label}," + ",".join(map(str, img.ravel())) for img, label in zip(X, y)]
    path.write_text(newline.join(rows) + newline, newline="")
    return path


def _random_images(n=7, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    X[0, 0, 0], X[0, 0, 1] = 0, 255  # both ends of the range
    y = rng.integers(0, 10, size=n, dtype=np.uint8)
    y[0], y[1] = 0, 9
    return X, y


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_csv_round_trip(tmp_path, newline):
    X, y = _random_images()
    X_back, y_back = load_csv(_write_csv(tmp_path / "m.csv", X, y, newline=newline))
    assert X_back.dtype == np.uint8 and X_back.shape == (7, 28, 28)
    assert y_back.dtype == np.uint8 and y_back.shape == (7,)
    np.testing.assert_array_equal(X_back, X)
    np.testing.assert_array_equal(y_back, y)


def test_csv_column_r_x_c_is_row_r_column_c(tmp_path):
    X, y = _random_images(n=2)
    names = HEADER.split(",")[1:]
    rows = [
        f"{label}," + ",".join(str(img[int(r) - 1, int(c) - 1]) for r, c in
                               (name.split("x") for name in names))
        for img, label in zip(X, y)
    ]
    path = tmp_path / "m.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    X_back, y_back = load_csv(path)
    np.testing.assert_array_equal(X_back, X)
    np.testing.assert_array_equal(y_back, y)


def test_csv_wrong_header_names_the_column(tmp_path):
    X, y = _random_images()
    path = _write_csv(tmp_path / "m.csv", X, y, header=HEADER.replace("1x3", "1x30"))
    with pytest.raises(ValueError, match=r"column 4 is '1x30', expected '1x3'"):
        load_csv(path)


def test_csv_header_with_wrong_width_is_refused(tmp_path):
    X, y = _random_images()
    path = _write_csv(tmp_path / "m.csv", X, y, header="," + HEADER)  # a pandas index column
    with pytest.raises(ValueError, match="header has 786 columns, expected 785"):
        load_csv(path)


def test_csv_row_with_wrong_column_count_names_the_line(tmp_path):
    X, y = _random_images()
    path = _write_csv(tmp_path / "m.csv", X, y)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0]  # line 4 loses its last pixel
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 4 has 784 columns, expected 785"):
        load_csv(path)


@pytest.mark.parametrize("bad", ["3.5", "abc", "", "1e2"])
def test_csv_non_integer_names_line_and_value(tmp_path, bad):
    X, y = _random_images()
    path = _write_csv(tmp_path / "m.csv", X, y)
    lines = path.read_text().splitlines()
    fields = lines[5].split(",")
    fields[30] = bad  # column 31 is pixel 2x2
    lines[5] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"line 6, column 31 \(2x2\): '{bad}' is not an integer"):
        load_csv(path)


@pytest.mark.parametrize("value, column", [(256, 100), (-1, 785), (1000, 1)])
def test_csv_value_out_of_range_names_line_and_value(tmp_path, value, column):
    X, y = _random_images()
    path = _write_csv(tmp_path / "m.csv", X, y)
    lines = path.read_text().splitlines()
    fields = lines[2].split(",")
    fields[column - 1] = str(value)
    lines[2] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    what = "label" if column == 1 else "pixel"
    with pytest.raises(ValueError, match=rf"line 3: {what} value {value}"):
        load_csv(path)


def test_csv_label_outside_digits_is_refused(tmp_path):
    X, y = _random_images()
    y[4] = 10
    with pytest.raises(ValueError, match=r"line 6: label value 10 .* outside 0-9"):
        load_csv(_write_csv(tmp_path / "m.csv", X, y))


def test_csv_without_rows_is_refused(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(HEADER + "\n")
    with pytest.raises(ValueError, match="no data rows"):
        load_csv(path)


@needs_mnist
def test_csv_of_real_mnist_matches_the_idx_files(tmp_path):
    X, y = load_mnist("test", root=MNIST, download=False)
    X_back, y_back = load_csv(_write_csv(tmp_path / "m.csv", X[:300], y[:300]))
    np.testing.assert_array_equal(X_back, X[:300])
    np.testing.assert_array_equal(y_back, y[:300])


# --- data files for xpnet train --data FILE ------------------------------------------------------


def test_load_file_reads_npz_as_keras_and_csv_label_first(tmp_path):
    from xpnet.datasets import load_file

    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=np.zeros((3, 2, 2), np.uint8), y_train=[0, 1, 2], x_test=np.ones((1, 2, 2), np.uint8),
             y_test=[1])
    X, y, X_test, y_test = load_file(npz)
    assert X.shape == (3, 2, 2) and X.dtype == np.uint8 and y.tolist() == [0, 1, 2] and y_test.tolist() == [1]
    csv = tmp_path / "d.csv"
    csv.write_text("label,a,b\n1,0,255\n0,3,4\n")
    X, y, X_test, y_test = load_file(csv)
    assert X.dtype == np.uint8 and X.tolist() == [[0, 255], [3, 4]] and y.tolist() == [1, 0] and X_test is None
    csv.write_text("1,0.5,-2\n0,3,4\n")  # no header; features that are not pixels stay as they are
    X, y, _, _ = load_file(csv)
    assert X.dtype == np.float64 and X[0].tolist() == [0.5, -2.0] and y.tolist() == [1, 0]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("d.npz", dict(x_train=np.zeros((2, 3))), "holds x_train, y_train, x_test, y_test .* this one holds x_train"),
        ("d.npz", dict(x_train=np.zeros((2, 3)), y_train=[0, 1], x_test=np.zeros((1, 3))), "the test pair optional"),
        ("d.npz", dict(x_train=np.zeros((2, 3)), y_train=[0, 1, 1]), "the train split has 3 labels"),
        ("d.csv", "label,a\n-1,3\n", "labels must be a column of integers >= 0"),
        ("d.csv", "label,a\n1,x\n", "d.csv: could not convert"),
        ("d.txt", "1,2\n", "a data file is .npz"),
    ],
)
def test_load_file_names_the_file_and_the_fault(tmp_path, name, content, match):
    from xpnet.datasets import load_file

    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_file(path)
