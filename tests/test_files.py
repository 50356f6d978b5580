"""Atomic writes (``xpnet.files``): the whole new file or the old one, never a mix, never a leftover."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from xpnet.files import atomic_write_bytes, check_file_target


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(str(path), b"second, longer")
    assert path.read_bytes() == b"second, longer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_written_file_is_an_ordinary_file_for_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640  # not mkstemp's owner-only 0o600


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "run.json"
    path.write_bytes(b"saved before")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "text, not bytes")
    assert path.read_bytes() == b"saved before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_target_must_be_a_writable_regular_file(tmp_path):
    assert check_file_target(str(tmp_path / "new.bin"), "model.safetensors") == tmp_path / "new.bin"
    (tmp_path / "old.bin").write_bytes(b"")
    assert check_file_target(tmp_path / "old.bin", "model.safetensors") == tmp_path / "old.bin"
    with pytest.raises(IsADirectoryError, match=f"^{tmp_path} is a folder; give a file name such as "
                                                f"{tmp_path / 'model.safetensors'}$"):
        check_file_target(tmp_path, "model.safetensors")
    with pytest.raises(FileNotFoundError, match=f"^folder {tmp_path / 'no'} does not exist$"):
        check_file_target(tmp_path / "no" / "model.safetensors", "model.safetensors")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="exists and is not a regular file"):
        check_file_target(fifo, "model.safetensors")
    assert isinstance(check_file_target(tmp_path / "x", "y"), Path)
