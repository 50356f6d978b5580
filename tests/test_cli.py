"""The ``xpnet`` command on the real MNIST: train, evaluate, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import _data_root
from xpnet.cli import main


@pytest.fixture
def data(mnist):
    """``--data`` for every command that reads MNIST: the real data folder, so no test ever
    downloads (the ``mnist`` fixture skips, with its reason, when the folder is missing)."""
    root = _data_root()
    assert root is not None and (root / "mnist").is_dir()
    return ["--data", str(root)]


def test_train_then_evaluate(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(["train", "--layers", "784,16,10", "--epochs", "1", "--seed", "1", "--out", str(out), "--quiet", *data]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    accuracy = float(printed.split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.85
    model_file = out / "model.safetensors"
    assert model_file.is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["command"][:2] == ["xpnet", "train"] and "--seed" in config["command"]
    assert len(config["data"]) == 4 and all(len(h) == 64 for h in config["data"].values())
    assert main(["evaluate", str(model_file), *data]) == 0
    assert f"test accuracy {accuracy:.4f}" in capsys.readouterr().out


def test_train_reports_bad_settings_clearly(tmp_path, data, capsys):
    assert main(["train", "--epochs", "1", "--batch-size", "0", "--out", str(tmp_path / "r"), *data]) == 2
    assert "batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_bad_layers_are_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--layers", "784,x,10"])
    assert "--layers takes widths" in capsys.readouterr().err


def test_evaluate_refuses_a_file_that_is_not_a_model(tmp_path, capsys):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a model at all")
    assert main(["evaluate", str(bogus)]) == 2
    assert "not a readable xpnet model file" in capsys.readouterr().err


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "xpnet", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "evaluate" in result.stdout


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_run_that_diverges_is_recorded_so_and_exits_1(tmp_path, data, capsys):
    out = tmp_path / "run"
    args = ["train", "--layers", "784,16,10", "--epochs", "5", "--lr", "1e4", "--on-divergence", "stop",
            "--out", str(out), "--quiet", *data]
    assert main(args) == 1
    assert "xpnet train: stopped: training diverged" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["warnings"]
    assert summary["epochs_run"] < 5
