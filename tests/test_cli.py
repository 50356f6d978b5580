"""The ``xpnet`` command on the real MNIST: train, evaluate, errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

import xpnet
from conftest import _data_root, cuda_unavailable
from xpnet.cli import _parser, _settings, main
from xpnet.runs import RunRecorder, read_metrics, read_run


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
    assert main(["evaluate", str(out), *data]) == 0  # the run folder: its model file
    assert f"test accuracy {accuracy:.4f}" in capsys.readouterr().out


def test_train_reports_bad_settings_clearly(tmp_path, data, capsys):
    near_the_bounds = ["--epochs", "1", "--optimizer", "sgd", "--momentum", "0.9", "--nesterov", "--weight-decay", "0",
                       "--lr", "1e-9", "--seed", "0"]
    assert main(["train", *near_the_bounds, "--out", str(tmp_path / "ok"), "--quiet", *data]) == 0
    capsys.readouterr()
    refused = [("--batch-size", "0", "an integer >= 1"), ("--epochs", "-1", "an integer >= 0"),
               ("--epochs", "1.5", "an integer >= 0"), ("--lr", "0", "a number > 0"), ("--lr", "inf", "a number > 0"),
               ("--weight-decay", "-1", "a number >= 0"), ("--weight-decay", "nan", "a number >= 0"),
               ("--momentum", "1", "a number in [0, 1)"), ("--seed", "-1", "an integer >= 0")]
    for option, value, message in refused:
        with pytest.raises(SystemExit) as exited:  # refused before any data is read: --data is not even there
            main(["train", option, value, "--out", str(tmp_path / "r"), "--data", str(tmp_path / "none")])
        assert exited.value.code == 2
        assert capsys.readouterr().err == f"xpnet train: error: argument {option}: takes {message}, got {value!r}\n"
    assert not (tmp_path / "r").exists()


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


# -- one set of defaults, and a CLI that explains itself ------------------------------------------


def subcommands(parser):
    """Every (sub)parser below ``parser``, by its prog."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from subcommands(sub)


def test_every_help_shows_every_default():
    parsers = list(subcommands(_parser()))
    assert {p.prog for p in parsers} >= {"xpnet train", "xpnet evaluate", "xpnet runs", "xpnet runs compare",
                                         "xpnet runs list", "xpnet draw"}
    for parser in parsers:
        for action in parser._actions:
            if action.nargs == 0 or action.required or isinstance(action, argparse._SubParsersAction):
                continue  # flags, required arguments and subcommands have no default
            shown = parser._get_formatter()._get_help_string(action)
            assert "default" in (shown or ""), (parser.prog, action.dest)
    train = next(p for p in parsers if p.prog == "xpnet train")
    assert "--seed SEED seeds the weights, shuffling, dropout and random shifts (default: 0)" in " ".join(train.format_help().split())


def test_the_cli_takes_the_librarys_default_rate_where_no_recipe_gives_one():
    from xpnet.optim import DEFAULT_LR
    from xpnet.recipes import RECIPES

    parse = lambda *a: _settings(_parser().parse_args(["train", *a]))  # noqa: E731
    assert parse()["lr"] == RECIPES["mlp"]["lr"] == 0.1  # the recipe's rate: a recipe, not a default
    assert parse("--arch", "lenet5", "--optimizer", "sgd")["lr"] == DEFAULT_LR["sgd"]
    assert parse("--arch", "cnn_shift") == RECIPES["cnn_shift"]
    assert parse("--arch", "cnn_shift", "--optimizer", "sgd")["lr"] == DEFAULT_LR["sgd"]
    assert parse("--optimizer", "adamw")["lr"] == DEFAULT_LR["adamw"]


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.skipif(cuda_unavailable() is None, reason="CUDA works here: nothing to refuse")
@pytest.mark.parametrize("how", ["option", "environment"])
def test_cuda_without_cupy_or_gpu_is_one_line_before_any_folder(tmp_path, monkeypatch, capsys, how):
    monkeypatch.chdir(tmp_path)
    if how == "environment":  # the CLI's default is the library's: $XPNET_BACKEND
        monkeypatch.setenv("XPNET_BACKEND", "cuda")
    assert main(["train", "--epochs", "1", *(["--backend", "cuda"] if how == "option" else [])]) == 2
    assert one_line(capsys.readouterr().err).startswith("xpnet train: error: backend 'cuda' needs")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "missing.npz"], "xpnet train: error: [Errno 2] No such file or directory: 'missing.npz'"),
        (["train", "--data", "d.txt"], "a data file is .npz"),
        (["train", "--test-data", "t.csv"], "--test-data goes with a --data FILE.npz or FILE.csv"),
        (["train", "--resume", "r", "--epochs", "3"], "--resume continues r with its own settings: give no --epochs"),
        (["train", "--resume", "nothing"], "nothing holds no recorded run to resume (no config.json)"),
        (["train", "--overwrite", "--resume", "r"], "give no --overwrite"),
        (["evaluate", "."], ". holds no model.safetensors (a run folder has one once an epoch has finished)"),
        (["train", "--epochs", "x"], "xpnet train: error: argument --epochs: takes an integer >= 0, got 'x'"),
        (["runs", "compare", "a"], "the following arguments are required: run_b"),
    ],
)
def test_a_user_mistake_is_one_line_and_exit_status_2_and_leaves_no_folder(tmp_path, monkeypatch, capsys, args,
                                                                          message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.txt").write_text("1,2\n")
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own
        code = exc.code
    assert code == 2
    assert message in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.rglob("*")) in ([], ["d.txt"], ["d.txt", "runs"])


def test_a_folder_holding_a_run_is_refused_before_the_data_naming_overwrite(tmp_path, capsys):
    run = tmp_path / "r"
    xpnet.MLP([20, 8, 3], seed=0).fit(*tiny(), epochs=1, verbose=0, run_dir=run)
    assert main(["train", "--out", str(run), "--data", str(tmp_path / "no-data")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "already holds a recorded run" in err and "xpnet train --overwrite" in err and "mnist" not in err.lower()
    assert read_run(run)["status"] == "completed"


def test_the_runs_listing_and_compare_are_subcommands(tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "xpnet", "runs", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "compare" in result.stdout and "list" in result.stdout
    for name, lr in (("a", 0.1), ("b", 0.05)):
        xpnet.MLP([20, 8, 3], seed=0).fit(*tiny(), epochs=1, lr=lr, verbose=0, run_dir=tmp_path / name)
    assert main(["runs", str(tmp_path)]) == 0 and main(["runs", "list", str(tmp_path)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing if line.startswith(("a ", "b "))] == ["a", "b", "a", "b"]
    assert main(["runs", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "* fit.lr" in " ".join(capsys.readouterr().out.split())


# -- data files, plots, resuming -------------------------------------------------------------------


def tiny(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 20))
    return X, (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)


def pixels(n=240, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, size=(n, 9))
    return X, (X[:, 0] > 127).astype(int) + 2 * (X[:, 1] > 127)


def test_train_on_npz_and_csv_files(tmp_path, capsys):
    X, y = pixels()
    npz, csv = tmp_path / "d.npz", tmp_path / "d.csv"
    np.savez(npz, x_train=X[:200].astype(np.uint8), y_train=y[:200], x_test=X[200:].astype(np.uint8), y_test=y[200:])
    np.savetxt(csv, np.column_stack([y, X]), fmt="%d", delimiter=",", header="label," + ",".join("abcdefghi"),
               comments="")
    assert main(["train", "--data", str(npz), "--out", str(tmp_path / "n"), "--epochs", "2", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    config = read_run(tmp_path / "n")["config"]
    assert config["model"]["layers"] == [9, 50, 25, 4] and config["fit"]["n_train"] == 200
    assert list(config["data"]) == [str(npz)] and len(config["data"][str(npz)]) == 64
    assert main(["evaluate", str(tmp_path / "n"), "--data", str(npz)]) == 0
    assert "test accuracy" in capsys.readouterr().out

    args = ["train", "--data", str(csv), "--out", str(tmp_path / "c"), "--epochs", "2", "--quiet"]
    assert main(args) == 0  # a CSV holds one split: no test set
    assert "train accuracy" in capsys.readouterr().out and read_run(tmp_path / "c")["config"]["fit"]["n_val"] == 0
    assert main([*args[:-3], "--test-data", str(csv), "--out", str(tmp_path / "t"), "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out and read_run(tmp_path / "t")["config"]["fit"]["n_val"] == 240


def test_evaluate_takes_a_run_folders_own_data_unless_told(tmp_path, monkeypatch, capsys):
    X, y = pixels()
    npz, csv = tmp_path / "d.npz", tmp_path / "d.csv"
    np.savez(npz, x_train=X[:200].astype(np.uint8), y_train=y[:200], x_test=X[200:].astype(np.uint8), y_test=y[200:])
    np.savetxt(csv, np.column_stack([y, X]), fmt="%d", delimiter=",")
    monkeypatch.chdir(tmp_path)  # relative paths in the recorded commands
    assert main(["train", "--data", "d.npz", "--out", "n", "--epochs", "2", "--quiet"]) == 0
    trained = capsys.readouterr().out.split("test accuracy ")[1].split(",")[0]
    assert main(["train", "--data", "d.csv", "--test-data", "d.npz", "--out", "c", "--epochs", "2", "--quiet"]) == 0
    tested = capsys.readouterr().out.split("test accuracy ")[1].split(",")[0]
    monkeypatch.chdir(tmp_path / "n")  # evaluated from elsewhere
    assert main(["evaluate", str(tmp_path / "n")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"test accuracy {trained}, ") and out.endswith(f" on {npz}\n")
    assert main(["evaluate", str(tmp_path / "c")]) == 0  # its --test-data
    out = capsys.readouterr().out
    assert out.startswith(f"test accuracy {tested}, ") and out.endswith(f" on {npz}\n")
    assert main(["evaluate", str(tmp_path / "c"), "--split", "train"]) == 0
    assert capsys.readouterr().out.endswith(f" on {csv}\n")
    assert main(["evaluate", str(tmp_path / "c"), "--data", str(csv)]) == 2  # told: the CSV alone
    assert "holds no test set (x_test, y_test): use --split train" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "n" / "model.safetensors"), "--data", str(npz)]) == 0  # a file: no run
    assert capsys.readouterr().out.startswith(f"test accuracy {trained}, ")


def test_plots_skipped_say_so_and_how_to_get_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it fails
    csv = tmp_path / "d.csv"
    X, y = pixels()
    np.savetxt(csv, np.column_stack([y, X]), fmt="%d", delimiter=",")
    assert main(["train", "--data", str(csv), "--out", str(tmp_path / "r"), "--epochs", "1", "--quiet"]) == 0
    assert "plots skipped: matplotlib is not installed (pip install 'xpnet[plot]')" in capsys.readouterr().err
    assert not list((tmp_path / "r").glob("*.png"))


def test_a_run_interrupted_then_resumed_ends_as_the_uninterrupted_one(tmp_path, monkeypatch, capsys):
    X, y = pixels()
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=X[:200].astype(np.uint8), y_train=y[:200], x_test=X[200:].astype(np.uint8), y_test=y[200:])
    monkeypatch.chdir(tmp_path)  # relative paths in the recorded command, read again on resume
    settings = ["--data", "d.npz", "--epochs", "4", "--batch-size", "32", "--momentum", "0.9", "--quiet"]
    assert main(["train", *settings, "--out", "whole"]) == 0

    record = RunRecorder.on_epoch_end

    def ctrl_c_after_epoch_1(self, epoch, logs):
        record(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunRecorder, "on_epoch_end", ctrl_c_after_epoch_1)
    assert main(["train", *settings, "--out", "cut"]) == 130
    monkeypatch.setattr(RunRecorder, "on_epoch_end", record)
    assert read_run("cut")["status"] == "interrupted"
    monkeypatch.chdir(tmp_path / "cut")  # resumed from elsewhere
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)

    figures = lambda run: [{k: v for k, v in m.items() if k not in ("seconds", "elapsed")}  # noqa: E731
                           for m in read_metrics(run)]
    assert figures("cut") == figures("whole") and len(figures("cut")) == 4
    weights = [xpnet.Sequential.get_weights(xpnet.load(f"{run}/model.safetensors")) for run in ("cut", "whole")]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    assert read_run("cut")["config"]["resumed"][0]["command"] == ["xpnet", "train", "--resume", str(tmp_path / "cut"),
                                                                 "--quiet"]
    capsys.readouterr()
    assert main(["train", "--resume", "cut"]) == 2
    assert "holds a finished run (completed)" in one_line(capsys.readouterr().err)
