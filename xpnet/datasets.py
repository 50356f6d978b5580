"""The real MNIST, read from its original IDX files, and the CSV layout of the NumPy notebook (README, Results).

``load_mnist`` looks for the four IDX files (gzip or raw) in one folder: the ``root`` argument,
else ``$XPNET_DATA/mnist``, else the user cache dir. Missing files are downloaded from public
mirrors with pooch. Every file is checked before a single array leaves this module: the IDX
magic number and dims, that the payload is exactly as long as the header says, and the sha256
of the decompressed file against the published MNIST bytes. A gzip's own bytes are not pinned,
because the same payload can be compressed in more than one way.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "MIRRORS",
    "SHA256",
    "MnistUnavailableError",
    "dataset_hashes",
    "load_csv",
    "load_file",
    "load_mnist",
]

#: sha256 of each DECOMPRESSED IDX file (header + data), identical to the official MNIST files.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Base URLs that serve ``<name>.gz`` for the four files; tried in order.
#: ``$XPNET_MNIST_MIRRORS`` (comma or space separated) replaces them.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX magic: two zero bytes, the element type (0x08 = uint8), the number of dims.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_SIDE = 28


class MnistUnavailableError(FileNotFoundError):
    """MNIST files are missing from the data folder and could not be downloaded."""


# -- MNIST -------------------------------------------------------------------------------------


def load_mnist(
    split: str = "train",
    root=None,
    *,
    download: bool = True,
    mirrors=None,
    progressbar: bool = True,
):
    """Load one split of the real MNIST.

    Parameters
    ----------
    split : {"train", "test"}
        ``"train"``: 60,000 images; ``"test"``: the 10,000 images of ``t10k``.
    root : str or path-like, optional
        Folder that holds the IDX files themselves (``train-images-idx3-ubyte.gz`` or the raw
        ``train-images-idx3-ubyte``, ...). Default: ``$XPNET_DATA/mnist`` when ``XPNET_DATA`` is
        set, else ``<user cache>/xpnet/mnist``.
    download : bool
        Download missing files into ``root`` from ``mirrors``.
    mirrors : sequence of str, optional
        Base URLs serving ``<name>.gz``; default ``$XPNET_MNIST_MIRRORS`` or :data:`MIRRORS`.
    progressbar : bool
        Show a tqdm progress bar while downloading.

    Returns
    -------
    X : ndarray of uint8, shape (N, 28, 28)
        Pixel intensities 0-255, rows then columns.
    y : ndarray of uint8, shape (N,)
        Digit labels 0-9.

    Raises
    ------
    ValueError
        Unknown split, or a file that is truncated, corrupt, not IDX, or not the MNIST bytes.
    MnistUnavailableError
        (a ``FileNotFoundError``) Files missing and ``download=False`` or every mirror failed.
    """
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = _resolve_root(root)
    names = _SPLITS[split]

    missing = [name for name in names if _find(root, name) is None]
    if missing:
        if not download:
            raise MnistUnavailableError(_missing_message(split, missing, root, "download=False"))
        _download(split, missing, root, _resolve_mirrors(mirrors), progressbar)

    images = _read_idx(_find(root, names[0]), names[0])
    labels = _read_idx(_find(root, names[1]), names[1])
    if len(images) != len(labels):  # cannot happen with the pinned hashes; guards the logic
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def dataset_hashes(split=None) -> dict:
    """The sha256 of every decompressed IDX file ``load_mnist`` accepts (it refuses any other).

    Parameters
    ----------
    split : {"train", "test"}, optional
        Only that split's two files; default all four.

    Returns
    -------
    dict
        ``{"train-images-idx3-ubyte": "ba89...", ...}``, ready to go into a run record.
    """
    if split is None:
        return dict(SHA256)
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    return {name: SHA256[name] for name in _SPLITS[split]}


def _resolve_root(root) -> Path:
    if root is not None:
        return Path(root).expanduser()
    data = os.environ.get("XPNET_DATA")
    if data:
        return Path(data).expanduser() / "mnist"
    import pooch  # lazy: only the default cache location needs it

    return Path(pooch.os_cache("xpnet")) / "mnist"


def _resolve_mirrors(mirrors) -> list[str]:
    if mirrors is None:
        env = os.environ.get("XPNET_MNIST_MIRRORS", "")
        mirrors = env.replace(",", " ").split() or MIRRORS
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    mirrors = [str(m) for m in mirrors]
    if not mirrors:
        raise ValueError("mirrors must name at least one base URL, got an empty list")
    return mirrors


def _find(root: Path, name: str):
    """The file holding ``name``: the gzip first, else the raw IDX; None if neither exists."""
    for path in (root / f"{name}.gz", root / name):
        if path.is_file():
            return path
    return None


def _read_idx(path: Path, name: str) -> np.ndarray:
    """A fresh copy of the verified array in ``path`` (parsed once per file version)."""
    stat = path.stat()
    return _read_idx_cached(str(path), name, stat.st_mtime_ns, stat.st_size).copy()


@functools.lru_cache(maxsize=4)
def _read_idx_cached(path: str, name: str, mtime_ns: int, size: int) -> np.ndarray:
    # mtime and size are part of the key so a replaced file is read again.
    with open(path, "rb") as f:
        data = f.read()
    return _parse_idx(data, name, where=path, compressed=path.endswith(".gz"))


def _parse_idx(data: bytes, name: str, *, where: str, compressed: bool) -> np.ndarray:
    """Decompress, check and decode one MNIST IDX file. Returns a read-only uint8 array."""
    if compressed:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:  # truncated or not gzip at all
            raise ValueError(f"{where}: not a complete gzip file ({e})") from None

    is_images = "images" in name
    expected_magic = _IMAGES_MAGIC if is_images else _LABELS_MAGIC
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{where}: truncated IDX file: {len(data)} bytes, shorter than its "
            f"{header}-byte header"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        kind = "images" if is_images else "labels"
        raise ValueError(
            f"{where}: wrong IDX magic number 0x{magic:08x}; MNIST {kind} start with "
            f"0x{expected_magic:08x}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if is_images and dims[1:] != (_SIDE, _SIDE):
        raise ValueError(f"{where}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected_size = int(np.prod(dims))
    payload = len(data) - header
    if payload != expected_size:
        problem = "truncated" if payload < expected_size else "has trailing bytes"
        raise ValueError(
            f"{where}: {problem}: the header says {dims[0]} items ({expected_size} bytes "
            f"of data) but the file holds {payload}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        raise ValueError(
            f"{where}: sha256 of the decompressed file is {digest}, expected {SHA256[name]} "
            f"for MNIST {name}; the file is corrupt or not the official MNIST"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return array  # read-only (backed by bytes); callers get copies


def _download(split, names, root: Path, mirrors, progressbar: bool) -> None:
    """Fetch ``<name>.gz`` for each name into ``root``; only verified files get their final name."""
    import pooch  # lazy: pulls in requests

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MnistUnavailableError(
            _missing_message(split, names, root, f"cannot create the folder ({e})")
        ) from None

    for i, name in enumerate(names):
        failures = []
        for base in mirrors:
            url = base.rstrip("/") + f"/{name}.gz"
            fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".part")
            os.close(fd)
            try:
                download = pooch.HTTPDownloader(progressbar=progressbar, chunk_size=1 << 16)
                download(url, tmp, None)
                with open(tmp, "rb") as f:
                    _parse_idx(f.read(), name, where=url, compressed=True)
            except (OSError, ValueError) as e:  # requests' errors are OSErrors
                failures.append(f"{url}: {e}")
                continue
            else:
                os.replace(tmp, root / f"{name}.gz")  # atomic: never a half file by that name
                break
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            reasons = "\n".join(f"  - {f}" for f in failures)
            raise MnistUnavailableError(
                _missing_message(split, names[i:], root, f"every mirror failed:\n{reasons}")
            )


def _missing_message(split, names, root, why) -> str:
    files = ", ".join(f"{n}.gz" for n in names)
    return (
        f"MNIST {split!r} split: missing {files} in {root} ({why}).\n"
        f"Put the IDX files (gzip or raw) in {root}, pass load_mnist(root=...) a folder that "
        f"holds them, or set XPNET_DATA to a folder that contains mnist/ with them."
    )


# -- the NumPy notebook's CSV ---------------------------------------------------------------------

_CSV_HEADER = ["label"] + [f"{r}x{c}" for r in range(1, _SIDE + 1) for c in range(1, _SIDE + 1)]
_INT = re.compile(r"\s*[+-]?\d+\s*")


def load_csv(path):
    """Load MNIST from the NumPy notebook's CSV: a header ``label,1x1,1x2,...,28x28``, one image a row.

    Column ``RxC`` is the pixel in row R, column C (1-based), so a row is the image in
    row-major order.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    X : ndarray of uint8, shape (N, 28, 28)
    y : ndarray of uint8, shape (N,)

    Raises
    ------
    ValueError
        Wrong header, a row with the wrong number of columns, a value that is not an integer,
        a pixel outside 0-255 or a label outside 0-9 (naming the line and the value), no rows.
    """
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline().rstrip("\r\n").split(",")
        _check_header(header, path)
        try:
            # Fast path: numpy's C parser. It refuses anything that is not an integer or a row
            # of another width; then the slow scan below finds and names the culprit.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
                table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
        except ValueError as e:
            _explain_bad_row(path)
            raise ValueError(f"{path}: {e}") from None  # e.g. an integer too large for int64
    if table.size == 0:
        raise ValueError(f"{path}: has a header but no data rows")
    if table.shape[1] != len(_CSV_HEADER):
        _explain_bad_row(path)

    labels, pixels = table[:, 0], table[:, 1:]
    _check_range(path, labels, 0, 9, "label", column_offset=0)
    _check_range(path, pixels, 0, 255, "pixel", column_offset=1)
    X = pixels.astype(np.uint8).reshape(-1, _SIDE, _SIDE)
    return X, labels.astype(np.uint8)


def _check_header(header, path):
    header = [h.strip() for h in header]
    if header == _CSV_HEADER:
        return
    if len(header) != len(_CSV_HEADER):
        raise ValueError(
            f"{path}: header has {len(header)} columns, expected {len(_CSV_HEADER)} "
            f"('label,1x1,1x2,...,28x28'); it starts {','.join(header[:4])!r}"
        )
    i = next(i for i, (a, b) in enumerate(zip(header, _CSV_HEADER)) if a != b)
    raise ValueError(
        f"{path}: header column {i + 1} is {header[i]!r}, expected {_CSV_HEADER[i]!r} "
        f"(the header must be 'label,1x1,1x2,...,28x28')"
    )


def _explain_bad_row(path):
    """Scan the rows in Python and raise a ValueError naming the first bad line and value."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        f.readline()
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue  # loadtxt skips blank lines too
            fields = line.split(",")
            if len(fields) != len(_CSV_HEADER):
                raise ValueError(
                    f"{path}: line {lineno} has {len(fields)} columns, expected "
                    f"{len(_CSV_HEADER)} (label + 784 pixels)"
                )
            for col, field in enumerate(fields, start=1):
                if not _INT.fullmatch(field):
                    raise ValueError(
                        f"{path}: line {lineno}, column {col} ({_CSV_HEADER[col - 1]}): "
                        f"{field!r} is not an integer"
                    )


def _check_range(path, values, low, high, what, column_offset):
    bad = (values < low) | (values > high)
    if bad.any():
        row, col = np.argwhere(bad.reshape(len(values), -1))[0]
        value = values.reshape(len(values), -1)[row, col]
        raise ValueError(
            f"{path}: line {row + 2}: {what} value {value} (column "
            f"{_CSV_HEADER[col + column_offset]}) is outside {low}-{high}"
        )


#: the arrays a data file for ``load_file`` holds, as in Keras's mnist.npz (the test pair optional)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_file(path):
    """Labelled examples from a data file: ``xpnet train --data FILE`` for data other than MNIST.

    - ``.npz``: the arrays ``x_train`` (N, ...) and ``y_train`` (N,), and optionally ``x_test``
      and ``y_test``, as Keras's mnist.npz holds them; read without pickle.
    - ``.csv``: one example a row, the integer label first, then the features (the NumPy notebook's
      layout, any number of features); a first line that does not start with a number is a
      header. It holds one split: the training rows.

    Features that are all integers in 0-255 are pixels (uint8, scaled by 1/255 by the model);
    other features are used as they are. Labels must be integers >= 0.

    Returns
    -------
    X_train, y_train, X_test, y_test : ndarrays (the test pair None when the file has none)

    Raises
    ------
    ValueError
        Another suffix, missing arrays, rows of different lengths, a value that is not a number,
        labels that are not integers >= 0, or train and test rows of different shapes; the
        message names the file.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS[:2] if k not in f.files]
            if missing or ("x_test" in f.files) != ("y_test" in f.files):
                raise ValueError(f"{path}: an npz data file holds {', '.join(NPZ_KEYS)} (the test pair optional); "
                                 f"this one holds {', '.join(f.files) or 'nothing'}")
            arrays = [f[k] if k in f.files else None for k in NPZ_KEYS]
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline().split(",", 1)[0].strip()
        header = not _is_number(first)
        try:
            table = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2, encoding="utf-8-sig")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if table.shape[0] == 0 or table.shape[1] < 2:
            raise ValueError(f"{path}: no rows of a label and at least one feature")
        arrays = [table[:, 1:], table[:, 0], None, None]
    else:
        raise ValueError(f"{path}: a data file is .npz (x_train, y_train, x_test, y_test) or .csv (label, features)")
    X_train, y_train, X_test, y_test = (_features(path, a) if i % 2 == 0 else _labels(path, a)
                                        for i, a in enumerate(arrays))
    for X, y, split in ((X_train, y_train, "train"), (X_test, y_test, "test")):
        if X is not None and (X.ndim < 2 or len(X) != len(y) or len(X) == 0):
            raise ValueError(f"{path}: the {split} split has {len(y)} labels for features of shape {X.shape}")
    if X_test is not None and X_test.shape[1:] != X_train.shape[1:]:
        raise ValueError(f"{path}: test rows of shape {X_test.shape[1:]}, training rows {X_train.shape[1:]}")
    return X_train, y_train, X_test, y_test


def _is_number(text) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _features(path, X):
    if X is None or X.dtype == np.uint8:
        return X
    if X.dtype.kind not in "iuf":
        raise ValueError(f"{path}: features must be numbers, got dtype {X.dtype}")
    if X.size and np.all((X >= 0) & (X <= 255) & (X == np.round(X))):
        return X.astype(np.uint8)  # pixels: the model scales them by 1/255
    return X.astype(np.float64, copy=False)


def _labels(path, y):
    if y is None:
        return None
    y = np.asarray(y).reshape(-1) if np.ndim(y) == 2 and np.shape(y)[1] == 1 else np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iuf" or (y.size and (np.any(y < 0) or np.any(y != np.round(y)))):
        raise ValueError(f"{path}: labels must be a column of integers >= 0")
    return y.astype(np.int64)
