"""Run records: config.json, metrics.jsonl written as training goes, Ctrl-C safety, listing, comparing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

import xpnet
from conftest import InterruptAfter
from xpnet.callbacks import Callback, EarlyStopping
from xpnet.runs import (
    RunRecorder,
    cli_runs,
    compare_runs,
    format_comparison,
    format_runs_table,
    is_running,
    list_runs,
    read_metrics,
    read_run,
)

ROOT = Path(__file__).resolve().parents[1]


class CheckMetricsFile(Callback):
    """Runs after the recorder: the file must be valid JSON, line by line, after every epoch."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.seen = []

    def on_epoch_end(self, epoch, logs):
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["epoch"] for r in records] == list(range(epoch + 1))
        assert records[-1]["loss"] == pytest.approx(logs["loss"])
        assert (self.run_dir / "model.safetensors").is_file()
        self.seen.append(len(records))


def small_data(mnist, n=3000):
    X_train, y_train, X_test, y_test = mnist
    return X_train[:n], y_train[:n], X_test[:1000], y_test[:1000]


def test_a_recorded_run_holds_config_metrics_model_and_plots(mnist, tmp_path):
    X, y, X_val, y_val = small_data(mnist)
    run = tmp_path / "runs" / "first"
    checker = CheckMetricsFile(run)
    model = xpnet.MLP([784, 32, 10], seed=3)
    history = model.fit(
        X, y, epochs=3, batch_size=64, optimizer="adam", lr=2e-3, validation_data=(X_val, y_val), verbose=0,
        callbacks=[RunRecorder(run, config={"data": {"sha256": "abc"}, "model": {"note": "merged"}},
                               eval_data=(X_val, y_val)), checker],
    )
    assert checker.seen == [1, 2, 3]

    config = json.loads((run / "config.json").read_text())
    assert config["model"] == {**model.config, "note": "merged"}
    assert config["fit"]["epochs"] == 3 and config["fit"]["batch_size"] == 64
    assert config["fit"]["lr"] == pytest.approx(2e-3) and config["fit"]["optimizer"].startswith("Adam")
    assert config["backend"] == "cpu" and config["data"] == {"sha256": "abc"}
    assert config["versions"]["xpnet"] == xpnet.__version__ and config["versions"]["numpy"] == np.__version__
    assert config["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))

    metrics = read_metrics(run)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert [m[key] for m in metrics] == pytest.approx(history.history[key])

    saved = xpnet.load(run / "model.safetensors")
    np.testing.assert_array_equal(saved.predict_proba(X_val), model.predict_proba(X_val))

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 3
    assert summary["eval_accuracy"] == pytest.approx(model.score(X_val, y_val))
    if summary["plots"] != "not drawn: matplotlib is not installed (pip install 'xpnet[plot]')":
        for name in summary["plots"]:
            assert (run / name).read_bytes()[:4] == b"\x89PNG"


def test_fit_run_dir_records_a_run(mnist, tmp_path):
    X, y, _, _ = small_data(mnist, 1000)
    xpnet.MLP([784, 16, 10], seed=0).fit(X, y, epochs=2, verbose=0, run_dir=tmp_path / "r")
    assert len(read_metrics(tmp_path / "r")) == 2
    assert read_run(tmp_path / "r")["status"] == "completed"


def test_a_folder_that_holds_a_run_is_not_overwritten_by_accident(mnist, tmp_path):
    X, y, _, _ = small_data(mnist, 500)
    xpnet.MLP([784, 8, 10], seed=0).fit(X, y, epochs=1, verbose=0, run_dir=tmp_path / "r")
    with pytest.raises(FileExistsError, match="already holds a recorded run"):
        xpnet.MLP([784, 8, 10], seed=0).fit(X, y, epochs=1, verbose=0, run_dir=tmp_path / "r")
    xpnet.MLP([784, 8, 10], seed=1).fit(X, y, epochs=2, verbose=0,
                                        callbacks=[RunRecorder(tmp_path / "r", overwrite=True)])
    assert len(read_metrics(tmp_path / "r")) == 2 and read_run(tmp_path / "r")["config"]["model"]["seed"] == 1


def test_an_exception_mid_run_keeps_the_finished_epochs(mnist, tmp_path):
    X, y, _, _ = small_data(mnist, 1000)

    class Boom(Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        xpnet.MLP([784, 16, 10], seed=0).fit(X, y, epochs=5, verbose=0,
                                             callbacks=[RunRecorder(tmp_path / "r"), Boom()])
    assert [m["epoch"] for m in read_metrics(tmp_path / "r")] == [0, 1]
    assert read_run(tmp_path / "r")["status"] == "interrupted"


@pytest.mark.skipif(sys.platform == "win32", reason="raises SIGINT")
def test_a_ctrl_c_held_back_while_an_epoch_is_saved_leaves_a_summary_of_that_epoch(mnist, tmp_path, monkeypatch):
    """The Ctrl-C lands while epoch 1's metrics line is written: it is delivered once the files
    are on disk, and summary.json counts epoch 1 (the model file's epoch), not epoch 0."""
    X, y, _, _ = small_data(mnist, 1000)
    writes = []
    real_sync = xpnet.runs._sync

    def sync_then_interrupt(f):  # after metrics.jsonl's fsync, the last write of each epoch
        real_sync(f)
        if str(f.name).endswith("metrics.jsonl"):
            writes.append(f.name)
        if len(writes) == 3:  # created empty at the start, then one line per epoch
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(xpnet.runs, "_sync", sync_then_interrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        model = xpnet.MLP([784, 16, 10], seed=0)
        with pytest.raises(KeyboardInterrupt):
            model.fit(X, y, epochs=5, verbose=0, callbacks=[RunRecorder(tmp_path / "r", plots=False)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [m["epoch"] for m in read_metrics(tmp_path / "r")] == [0, 1]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert (summary["status"], summary["epochs_run"], summary["model_epoch"]) == ("interrupted", 2, 1)
    saved = xpnet.load(tmp_path / "r" / "model.safetensors")
    assert all(np.array_equal(a, b) for pair in zip(saved.get_weights(), model.get_weights()) for a, b in zip(*pair))


INTERRUPTED_TRAINING = textwrap.dedent(
    """
    import hashlib, json, signal, sys
    import numpy as np
    import xpnet
    from xpnet.callbacks import Callback
    from xpnet.runs import RunRecorder

    run = sys.argv[1]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with Ctrl-C ignored
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(4000, 784), dtype=np.uint8)
    y = rng.integers(0, 10, size=4000)

    class Fingerprint(Callback):  # before the recorder: the weights each epoch ended with
        def on_epoch_end(self, epoch, logs):
            digest = hashlib.sha256(b"".join(w.tobytes() + b.tobytes() for w, b in self.model.get_weights()))
            with open(run + "-fingerprints.txt", "a") as f:
                f.write(digest.hexdigest() + "\\n")

    recorder = RunRecorder(run, eval_data=(X[:500], y[:500]), plots=False)
    xpnet.MLP([784, 64, 10], seed=0).fit(X, y, epochs=10_000, batch_size=32, optimizer="adam", lr=1e-4,
                                          verbose=0, callbacks=[Fingerprint(), recorder])
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_ctrl_c_leaves_the_last_finished_epochs_model_and_metrics(tmp_path):
    """A real process, a real SIGINT while it trains: what is on disk stays consistent."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_TRAINING, str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fingerprints = Path(f"{run}-fingerprints.txt")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if fingerprints.exists() and len(fingerprints.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()[1].decode()
            time.sleep(0.05)
        else:
            pytest.fail("training did not finish two epochs in 120 s")
        time.sleep(0.3)  # land somewhere inside the next epoch
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err

    metrics = read_metrics(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(metrics) >= 2  # every line complete and valid JSON
    assert [m["epoch"] for m in metrics] == list(range(len(metrics)))
    saved = xpnet.load(run / "model.safetensors")
    import hashlib

    digest = hashlib.sha256(b"".join(w.tobytes() + b.tobytes() for w, b in saved.get_weights())).hexdigest()
    epochs_fingerprinted = fingerprints.read_text().splitlines()
    # The model on disk is the one of the last epoch in metrics.jsonl (the interrupt may have
    # come after an epoch's fingerprint but before its record: then that epoch does not count).
    assert len(epochs_fingerprinted) in (len(metrics), len(metrics) + 1)
    assert digest == epochs_fingerprinted[len(metrics) - 1]
    assert read_run(run)["status"] == "interrupted"
    # The summary describes that file, not the half-trained model the interrupt left in memory.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_epoch"] == len(metrics) - 1
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(4000, 784), dtype=np.uint8)
    y = rng.integers(0, 10, size=4000)
    assert summary["eval_accuracy"] == saved.score(X[:500], y[:500])
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.tmp"))


def test_read_metrics_ignores_only_a_cut_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "loss": 1.0}\n{"epoch": 1, "lo')
    assert read_metrics(tmp_path) == [{"epoch": 0, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "lo\n{"epoch": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_metrics(tmp_path)


def two_runs(mnist, root):
    X, y, X_val, y_val = small_data(mnist, 1500)
    for name, lr, epochs in (("slow", 1e-3, 2), ("fast", 5e-3, 3)):
        xpnet.MLP([784, 24, 10], seed=0).fit(X, y, epochs=epochs, optimizer="adam", lr=lr,
                                             validation_data=(X_val, y_val), verbose=0, run_dir=root / name)
    return root / "slow", root / "fast"


def test_list_and_compare_runs(mnist, tmp_path, capsys):
    slow, fast = two_runs(mnist, tmp_path / "runs")
    (tmp_path / "runs" / "not-a-run").mkdir()
    runs = list_runs(tmp_path / "runs")
    assert [r["name"] for r in runs] == ["slow", "fast"]
    best = max(m["val_accuracy"] for m in read_metrics(fast))
    assert runs[1]["best_val_accuracy"] == best and runs[1]["epochs"] == "3/3"
    assert runs[1]["layers"] == "784-24-10" and runs[1]["optimizer"] == "Adam"

    table = format_runs_table(runs)
    assert table.splitlines()[0].split()[:3] == ["name", "layers", "optimizer"]
    assert f"{best:.2%}" in table and "completed" in table

    comparison = compare_runs(slow, fast)
    differing = {key for key, a, b in comparison["config"] if a != b}
    assert {"fit.lr", "fit.epochs", "fit.optimizer"} <= differing
    assert "model.layers" not in differing
    assert [e for e, _, _ in comparison["metrics"]] == [0, 1, 2]
    assert comparison["metrics"][2][1] is None and comparison["metrics"][2][2]["epoch"] == 2
    text = format_comparison(comparison)
    assert "* fit.lr" in " ".join(text.split()) or "*  fit.lr" in text

    assert cli_runs(types.SimpleNamespace(dir=str(tmp_path / "runs"), compare=None)) == 0
    assert capsys.readouterr().out.strip() == table
    assert cli_runs(types.SimpleNamespace(dir=None, compare=[str(slow), str(fast)])) == 0
    assert capsys.readouterr().out.strip() == text.strip()
    assert cli_runs(types.SimpleNamespace(dir=str(tmp_path / "none"), compare=None)) == 1
    assert "no runs folder" in capsys.readouterr().err
    assert cli_runs(types.SimpleNamespace(dir=None, compare=[str(slow), str(tmp_path)])) == 1
    assert "not a run folder" in capsys.readouterr().err


def test_the_xpnet_runs_command(mnist, tmp_path):
    two_runs(mnist, tmp_path / "runs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    listing = subprocess.run([sys.executable, "-m", "xpnet", "runs", str(tmp_path / "runs")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "slow" in listing.stdout and "fast" in listing.stdout
    compared = subprocess.run([sys.executable, "-m", "xpnet", "runs", "compare", str(tmp_path / "runs" / "slow"),
                               str(tmp_path / "runs" / "fast")], capture_output=True, text=True, env=env, timeout=120)
    assert compared.returncode == 0, compared.stderr
    assert "fit.lr" in compared.stdout and "val_accuracy A" in compared.stdout


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler, even where pytest started with Ctrl-C ignored (`cmd &` in a script)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_a_ctrl_c_while_saving_waits_until_the_epoch_is_on_disk(tmp_path, ctrl_c_raises):
    """Deterministic: the Ctrl-C arrives in the middle of saving the model."""
    model = xpnet.MLP([784, 8, 10], seed=0)
    recorder = RunRecorder(tmp_path / "r")
    recorder.model = model
    recorder.on_train_begin({"epochs": 3})
    real_save = model.save

    def save_then_get_interrupted(path):
        os.kill(os.getpid(), signal.SIGINT)
        real_save(path)

    model.save = save_then_get_interrupted
    with pytest.raises(KeyboardInterrupt):
        recorder.on_epoch_end(0, {"loss": 1.5, "accuracy": 0.5})
    assert read_metrics(tmp_path / "r") == [{"epoch": 0, "loss": 1.5, "accuracy": 0.5,
                                              "elapsed": pytest.approx(0, abs=60)}]
    assert (tmp_path / "r" / "model.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- one run per folder, and a killed run told from a running one ---------------------------------

def tiny_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 20))
    return X, (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)


def started_recorder(run_dir, **kwargs):
    """A recorder that has begun a 3-epoch run of a tiny model and finished its first epoch."""
    recorder = RunRecorder(run_dir, plots=False, **kwargs)
    recorder.model = xpnet.MLP([20, 8, 3], seed=0)
    recorder.on_train_begin({"epochs": 3})
    recorder.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.5})
    return recorder


def test_a_folder_in_use_refuses_a_second_recorder_even_with_overwrite(tmp_path):
    run = tmp_path / "r"
    first = started_recorder(run)
    config = (run / "config.json").read_bytes()
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=rf"{run} is in use by another run \(pid {os.getpid()} on "):
            RunRecorder(run, overwrite=overwrite).claim()
    with pytest.raises(FileExistsError, match="in use by another run"):
        xpnet.MLP([20, 8, 3], seed=1).fit(*tiny_data(), epochs=1, verbose=0, run_dir=run)
    assert (run / "config.json").read_bytes() == config and len(read_metrics(run)) == 1
    assert read_run(run)["status"] == "running"

    first.on_train_end({"epochs_run": 1})
    assert read_run(run)["status"] == "interrupted"
    second = RunRecorder(run, overwrite=True)
    second.claim()  # the folder is free again once its run has ended
    assert not (run / "config.json").exists() and not (run / "summary.json").exists()
    second.release()


RACE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from xpnet.runs import RunRecorder

    run, go, done = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    while not go.exists():  # start together
        time.sleep(0.001)
    recorder = RunRecorder(run, overwrite=True)  # kept: the claim lasts while its lock file is open
    try:
        recorder.claim()
    except FileExistsError as e:
        print("refused:", e, flush=True)
    else:
        print("claimed", flush=True)
        while not done.exists():  # hold the folder until every other process has tried
            time.sleep(0.01)
    """
)


def python_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_of_runs_started_at_once_on_one_folder_exactly_one_gets_it(tmp_path):
    run, go, done = tmp_path / "r", tmp_path / "go", tmp_path / "done"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(run), str(go), str(done)], env=python_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        time.sleep(0.3)
        go.touch()
        results = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        done.touch()
        errors = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert results[0] == "claimed"
    assert all(r.startswith(f"refused: {run} is in use by another run") for r in results[1:]), results


HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from test_runs import started_recorder

    recorder = started_recorder(sys.argv[1])  # kept: the claim lasts while its lock file is open
    print("started", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="flock and SIGKILL")
def test_a_killed_run_is_told_from_a_running_one_and_frees_its_folder(tmp_path):
    run = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), str(ROOT / "tests")], env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "started\n", proc.stderr.read()
        assert read_run(run)["status"] == "running"
        with pytest.raises(FileExistsError, match=rf"in use by another run \(pid {proc.pid} on "):
            RunRecorder(run, overwrite=True).claim()
    finally:
        proc.kill()  # SIGKILL: no handler, no summary.json
        proc.wait()
    assert read_run(run)["status"] == "killed"
    assert [m["epoch"] for m in read_metrics(run)] == [0]
    with pytest.raises(FileExistsError, match="already holds a recorded run"):
        RunRecorder(run).claim()  # the killed run is a record still: kept unless overwrite
    xpnet.MLP([20, 8, 3], seed=1).fit(*tiny_data(), epochs=2, verbose=0,
                                      callbacks=[RunRecorder(run, overwrite=True, plots=False)])
    assert read_run(run)["status"] == "completed" and len(read_metrics(run)) == 2


def test_xpnet_train_refuses_a_folder_in_use_before_loading_data(tmp_path, capsys):
    from xpnet.cli import main

    run = tmp_path / "r"
    holder = started_recorder(run)
    try:
        code = main(["train", "--epochs", "1", "--out", str(run), "--data", str(tmp_path / "no-data"), "--quiet"])
    finally:
        holder.release()
    assert code == 2
    err = capsys.readouterr().err
    assert f"{run} is in use by another run" in err and "mnist" not in err.lower()


def test_xpnet_train_gives_runs_started_in_the_same_second_their_own_folders(tmp_path, monkeypatch):
    from xpnet.cli import _new_run_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: fmt.replace("%Y%m%d-%H%M%S", "20250101-120000"))
    folders = [_new_run_folder("mlp") for _ in range(3)]
    assert [f.name for f in folders] == ["mlp-20250101-120000", "mlp-20250101-120000-2", "mlp-20250101-120000-3"]
    assert all((tmp_path / f).is_dir() for f in folders)


# -- summary.json describes the model file beside it ---------------------------------------------

@pytest.mark.parametrize("recorder_last", [True, False])
def test_after_early_stopping_restores_the_summary_still_describes_the_model_file(tmp_path, recorder_last):
    from xpnet.callbacks import EarlyStopping

    X, y = tiny_data(300, seed=20)
    model = xpnet.MLP([20, 8, 3], dtype="float64", seed=0)
    stopper = EarlyStopping("lr", mode="max", patience=3)  # best epoch 0, stops after epoch 3
    recorder = RunRecorder(tmp_path / "run", eval_data=(X, y), plots=False)
    callbacks = [stopper, recorder] if recorder_last else [recorder, stopper]
    model.fit(X, y, epochs=10, batch_size=16, lr=0.2, callbacks=callbacks, verbose=0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    saved = xpnet.load(tmp_path / "run" / "model.safetensors")
    assert summary["status"] == "stopped early" and summary["epochs_run"] == 4
    assert summary["eval_accuracy"] == saved.score(X, y)
    # the folder keeps the last epoch, the one its last metrics line describes, in either order
    assert summary["model_epoch"] == read_metrics(tmp_path / "run")[-1]["epoch"] == 3
    assert stopper.best_epoch == 0 and summary["eval_accuracy"] != model.score(X, y)  # the restored model


def test_weights_no_epoch_ended_with_are_not_what_the_summary_describes(tmp_path):
    """As after a Ctrl-C mid-epoch: the file keeps the last finished epoch, and the summary it."""
    X, y = tiny_data()
    recorder = RunRecorder(tmp_path / "r", eval_data=(X, y), plots=False)
    model = recorder.model = xpnet.MLP([20, 8, 3], seed=0)
    recorder.on_train_begin({"epochs": 3})
    recorder.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.5})
    model.fit(X, y, epochs=1, lr=5.0, verbose=0)  # half an epoch more, in effect
    recorder.on_train_end({"epochs_run": 1})
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    saved = xpnet.load(tmp_path / "r" / "model.safetensors")
    assert summary["status"] == "interrupted" and summary["model_epoch"] == 0
    assert summary["eval_accuracy"] == saved.score(X, y) != model.score(X, y)


def test_warnings_and_divergence_reach_the_summary_and_the_listing(tmp_path):
    recorder = started_recorder(tmp_path / "runs" / "wild")
    warning = "loss diverged: 41.2 in epoch 1, above the first epoch's 2.3"
    recorder.on_train_end({"epochs_run": 1, "warnings": [warning], "diverged": True})
    summary = json.loads((tmp_path / "runs" / "wild" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["warnings"] == [warning]

    calm = started_recorder(tmp_path / "runs" / "calm")
    calm.on_train_end({"epochs_run": 1, "warnings": [warning, warning]})  # warned, not stopped
    assert read_run(tmp_path / "runs" / "calm")["status"] == "interrupted"

    plain = started_recorder(tmp_path / "runs" / "plain")
    plain.on_train_end({"epochs_run": 1})  # what fit passes without warnings
    assert json.loads((tmp_path / "runs" / "plain" / "summary.json").read_text())["warnings"] == []

    table = format_runs_table(list_runs(tmp_path / "runs"))
    statuses = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert statuses["wild"].endswith("diverged (1 warning)")
    assert statuses["calm"].endswith("interrupted (2 warnings)")
    assert statuses["plain"].endswith("interrupted")
    text = format_comparison(compare_runs(tmp_path / "runs" / "wild", tmp_path / "runs" / "plain"))
    assert f"warning (A): {warning}" in text and "status: A diverged (1 warning), B interrupted" in text


# -- a damaged run folder is named, never breaks the listing -------------------------------------

DAMAGES = {  # folder name: (file, its new bytes or None to delete it, what the error says)
    "config-cut": ("config.json", b'{"model": {"lay', "config.json: not valid JSON"),
    "config-a-list": ("config.json", b"[1, 2]", "config.json is not a JSON object: [1, 2]"),
    "config-fit-text": ("config.json", b'{"fit": "adam"}', "config.json: 'fit' is not a JSON object"),
    "config-not-utf8": ("config.json", b'{"name": "\xff"}', "config.json: not UTF-8 text"),
    "config-deep": ("config.json", b"[" * 100_000, "config.json: not valid JSON"),
    "config-gone": ("config.json", None, "is not a run folder: it has no config.json"),
    "metrics-bad-line": ("metrics.jsonl", b'{"epoch": 0}\n{"epo\n{"epoch": 2}\n', "jsonl, line 2: not valid JSON"),
    "metrics-bad-last-line": ("metrics.jsonl", b'{"epoch": 0}\n{"epo\n', "metrics.jsonl, line 2: not valid JSON"),
    "metrics-not-object": ("metrics.jsonl", b"[0]\n", "metrics.jsonl, line 1 is not a JSON object"),
    "metrics-text-number": ("metrics.jsonl", b'{"val_accuracy": "high"}\n', "line 1: 'val_accuracy' is not a number"),
    "metrics-gone": ("metrics.jsonl", None, "metrics.jsonl is missing"),
    "model-gone": ("model.safetensors", None, "model.safetensors is missing, though metrics.jsonl records 1 epoch(s)"),
    "summary-empty": ("summary.json", b"", "summary.json: not valid JSON"),
    "summary-text": ("summary.json", b'"completed"', 'summary.json is not a JSON object: "completed"'),
    "summary-no-status": ("summary.json", b'{"epochs_run": 1}', "summary.json: 'status' is missing"),
    "summary-warnings-text": ("summary.json", b'{"status": "done", "warnings": "x"}', "'warnings' is not a JSON array"),
}


def damaged_runs(root):
    """``root/good``, a finished run, and a copy of it for each damage in DAMAGES."""
    import shutil

    started_recorder(root / "good").on_train_end({"epochs_run": 1})
    for name, (file, data, _) in DAMAGES.items():
        shutil.copytree(root / "good", root / name)
        if data is None:
            (root / name / file).unlink()
        else:
            (root / name / file).write_bytes(data)
    (root / "not-a-run").mkdir()
    (root / "notes.txt").write_text("not a folder")
    return root


def test_xpnet_runs_lists_every_readable_run_and_names_each_damaged_one(tmp_path, capsys):
    from xpnet.cli import main

    root = damaged_runs(tmp_path / "runs")
    runs = list_runs(root)
    assert [r["name"] for r in runs if "error" not in r] == ["good"]
    errors = {r["name"]: r["error"] for r in runs if "error" in r}
    assert set(errors) == set(DAMAGES)
    for name, (file, _, says) in DAMAGES.items():
        assert says in errors[name], (name, errors[name])
        assert str(root / name) in errors[name] and "\n" not in errors[name]

    assert main(["runs", str(root)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[2].split()[0] == "good" and len(lines) == 3 + len(DAMAGES) and err == ""
    assert sorted(lines[3:]) == sorted(f"{name}: unreadable: {errors[name]}" for name in DAMAGES)

    for name in DAMAGES:
        assert main(["runs", "compare", str(root / "good"), str(root / name)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err == f"xpnet runs: {errors[name]}\n"


def test_a_cell_with_a_newline_stays_in_its_row(tmp_path):
    recorder = started_recorder(tmp_path / "runs" / "r")
    recorder.on_train_end({"epochs_run": 1})
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    config["fit"]["optimizer"] = "SGD\nsecond line"
    (tmp_path / "runs" / "r" / "config.json").write_text(json.dumps(config))
    assert len(format_runs_table(list_runs(tmp_path / "runs")).splitlines()) == 3


def test_a_recorder_that_fails_to_begin_gives_the_folder_back(tmp_path):
    recorder = RunRecorder(tmp_path / "r")
    recorder.model = None  # on_train_begin fails reading the model, after claiming the folder
    with pytest.raises(AttributeError):
        recorder.on_train_begin({"epochs": 1})
    assert is_running(tmp_path / "r") is False



def test_discard_after_a_failed_start_removes_only_an_empty_run(tmp_path):
    def begun(run, **kwargs):
        recorder = RunRecorder(run, plots=False, **kwargs)
        recorder.model = xpnet.MLP([20, 8, 3], seed=0)
        recorder.on_train_begin({"epochs": 3})
        return recorder

    begun(tmp_path / "empty").discard()  # no epoch recorded: the folder goes
    assert not (tmp_path / "empty").exists()

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "notes.txt").write_text("mine")
    begun(tmp_path / "shared").discard()  # the run's files go, the user's file and folder stay
    assert sorted(f.name for f in (tmp_path / "shared").iterdir()) == ["notes.txt"]

    started_recorder(tmp_path / "one-epoch").discard()  # an epoch on disk is a record: kept
    assert len(read_metrics(tmp_path / "one-epoch")) == 1 and is_running(tmp_path / "one-epoch") is False

    started_recorder(tmp_path / "held").on_train_end({"epochs_run": 1})
    resumed = RunRecorder(tmp_path / "held", resume=True)
    resumed.claim()
    (tmp_path / "held" / "metrics.jsonl").write_text("")  # even with no epoch left, a resumed run's
    resumed.discard()                                       # folder is the user's: kept
    assert (tmp_path / "held" / "config.json").is_file()

    holder = started_recorder(tmp_path / "busy")
    refused = RunRecorder(tmp_path / "busy", overwrite=True)
    with pytest.raises(FileExistsError):
        refused.claim()
    refused.discard()  # it never held the folder: the other run's files stay
    assert len(read_metrics(tmp_path / "busy")) == 1 and is_running(tmp_path / "busy") is True
    holder.release()


# -- a run stopped and resumed ends bit for bit as the uninterrupted one --------------------------

def tiny_mlp():
    return xpnet.MLP([12, 16, 3], seed=1)


def tiny_cnn():
    from xpnet.layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, RandomShift

    layers = [RandomShift(1), Conv2D(4, 3, activation="relu"), MaxPool2D(2), Flatten(), Dropout(0.3), Dense(3)]
    return xpnet.Sequential(layers, input_shape=(8, 8, 1), seed=1)


def blobs(shape, n=160, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, *shape))
    flat = X.reshape(n, -1)
    return X, (flat[:, 0] > 0).astype(int) + (flat[:, 1] > 0)


def figures(run):
    """Every recorded number of every epoch but the times."""
    return [{k: v for k, v in m.items() if k not in ("seconds", "elapsed")} for m in read_metrics(run)]


def flat_weights(model):
    return xpnet.Sequential.get_weights(model)


@pytest.mark.filterwarnings("ignore::xpnet.callbacks.DivergenceWarning")  # the CNN learns little in 5 epochs
@pytest.mark.parametrize("kernels", ["fast", "xp"])
@pytest.mark.parametrize(
    "optimizer",
    [dict(optimizer="sgd", lr=0.05, momentum=0.9), dict(optimizer="adam", lr=0.01, schedule="cosine")],
    ids=["sgd-momentum", "adam-cosine"],
)
@pytest.mark.parametrize("make, shape", [(tiny_mlp, (12,)), (tiny_cnn, (8, 8, 1))], ids=["mlp", "cnn-shift-dropout"])
def test_a_run_stopped_after_epoch_k_and_resumed_ends_bit_identical(tmp_path, monkeypatch, kernels, optimizer, make,
                                                                   shape):
    if kernels == "xp":
        monkeypatch.setenv("XPNET_KERNELS", "xp")
    else:
        monkeypatch.delenv("XPNET_KERNELS", raising=False)
    X, y = blobs(shape)
    settings = dict(epochs=5, batch_size=16, shuffle=True, verbose=0, validation_data=(X[:40], y[:40]), **optimizer)
    whole = make()
    whole.fit(X, y, run_dir=tmp_path / "whole", **settings)

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        make().fit(X, y, callbacks=[RunRecorder(cut, plots=False), InterruptAfter(1)], **settings)
    assert read_run(cut)["status"] == "interrupted" and len(read_metrics(cut)) == 2
    weights_only = xpnet.load(cut / "model.safetensors")

    history = make().fit(X, y, run_dir=cut, resume=True, **settings)
    assert history.epoch == [2, 3, 4]
    resumed = xpnet.load(cut / "model.safetensors")
    assert all(np.array_equal(a, b) for a, b in zip(flat_weights(resumed), flat_weights(whole)))
    assert figures(cut) == figures(tmp_path / "whole")
    run = read_run(cut)
    assert run["status"] == "completed" and run["config"]["resumed"][0]["from_epoch"] == 2

    # the checkpoint is what made it so: the weights alone, with a fresh optimizer and
    # generators, continue along another path
    weights_only.fit(X, y, initial_epoch=2, **settings)
    assert not all(np.array_equal(a, b) for a, b in zip(flat_weights(weights_only), flat_weights(whole)))


def test_a_resumed_run_goes_on_with_its_callbacks_state(tmp_path):
    """EarlyStopping keeps, in the checkpoint, its best loss, its patience count and the best
    epoch's weights: cut after epoch 10 (best epoch 9), the resumed run stops at epoch 11 and
    ends with epoch 9's weights, as the uninterrupted one; without that state it would have
    taken epoch 11 as its best and trained on. Other callbacks than the recorded ones are refused."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 12))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    Xv = rng.normal(size=(60, 12))
    val = (Xv, (Xv[:, 0] > 0).astype(int) + (Xv[:, 1] > 0))
    settings = dict(epochs=30, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.9, validation_data=val, verbose=0)

    def train(run, *after, resume=False):
        stopper = EarlyStopping("val_loss", patience=2)
        model = xpnet.MLP([12, 16, 3], seed=0)
        history = model.fit(X, y, callbacks=[stopper, RunRecorder(run, plots=False, resume=resume), *after],
                            **settings)
        return model, history, stopper

    whole, whole_history, whole_stopper = train(tmp_path / "whole")
    assert (whole_stopper.best_epoch, whole_stopper.stopped_epoch, whole_history.epoch[-1]) == (9, 11, 11)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", InterruptAfter(10))
    resumed, history, stopper = train(tmp_path / "cut", resume=True)
    assert history.epoch == [11] and (stopper.best_epoch, stopper.stopped_epoch) == (9, 11)
    assert all(np.array_equal(a, b) for a, b in zip(flat_weights(resumed), flat_weights(whole)))
    assert figures(tmp_path / "cut") == figures(tmp_path / "whole")

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "other", InterruptAfter(3))
    message = (r"was recorded with the callbacks \['DivergenceMonitor', 'EarlyStopping'\] \(those keeping state, "
               r"before the recorder\), now \['DivergenceMonitor'\]: resume it with the same")
    with pytest.raises(ValueError, match=message):
        xpnet.MLP([12, 16, 3], seed=0).fit(X, y, callbacks=[RunRecorder(tmp_path / "other", resume=True)], **settings)


def interrupted_run(run, **settings):
    X, y = tiny_data()
    with pytest.raises(KeyboardInterrupt):
        xpnet.MLP([20, 8, 3], seed=0).fit(X, y, epochs=4, verbose=0, optimizer="adam",
                                          callbacks=[RunRecorder(run, plots=False), InterruptAfter(1)], **settings)
    return X, y


def resume(run, **settings):
    X, y = tiny_data()
    return xpnet.MLP([20, 8, 3], seed=0).fit(X, y, epochs=4, verbose=0, optimizer="adam", run_dir=run, resume=True,
                                             **settings)


def test_the_checkpoint_is_safetensors_beside_the_model_and_names_its_epoch(tmp_path):
    from safetensors import safe_open

    interrupted_run(tmp_path / "r")
    with safe_open(tmp_path / "r" / "checkpoint.safetensors", "np") as f:
        names, meta = set(f.keys()), f.metadata()
        t = f.get_tensor("optimizer.0.t")
    assert names == {f"optimizer.{i}.{k}" for i in range(4) for k in ("m", "v", "t")}
    assert meta["format"] == "xpnet.checkpoint"
    assert meta["epoch"] == "1" == str(read_metrics(tmp_path / "r")[-1]["epoch"])
    assert t.dtype == np.int64 and int(t) == 2 * 2  # two epochs of two batches of 128 out of 200 rows
    assert json.loads(meta["rng"]).keys() == {"model"}


def test_resume_refuses_what_it_cannot_continue_exactly(tmp_path):
    run = tmp_path / "r"
    interrupted_run(run)
    other = r"recorded with other settings \(fit.lr was 0.001, now 0.002; fit.optimizer was 'Adam\(lr=0.001"
    with pytest.raises(ValueError, match=other):
        resume(run, lr=0.002)
    with pytest.raises(FileNotFoundError, match="holds no recorded run to resume"):
        resume(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    holder = RunRecorder(run, resume=True)
    holder.claim()
    try:
        with pytest.raises(FileExistsError, match="is in use by another run"):
            resume(run)
    finally:
        holder.release()
    resume(run)
    assert read_run(run)["status"] == "completed"
    with pytest.raises(ValueError, match=r"holds a finished run \(completed\): there is nothing to resume"):
        resume(run)
    with pytest.raises(FileExistsError, match=r"xpnet train --overwrite\) or, if unfinished, continue it"):
        RunRecorder(run).claim()


def test_files_a_kill_left_disagreeing_are_refused_and_a_cut_line_is_dropped(tmp_path):
    run = tmp_path / "r"
    interrupted_run(run)
    metrics = (run / "metrics.jsonl").read_text()
    lines = metrics.splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0])  # killed after the checkpoint, before its metrics line
    with pytest.raises(ValueError, match="holds epoch 2 but metrics.jsonl ends at epoch 1"):
        resume(run)
    (run / "metrics.jsonl").write_text(metrics + '{"epoch": 2, "lo')  # killed while writing a line
    resume(run)
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1, 2, 3]
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


def test_a_checkpoint_that_does_not_go_with_the_model_file_is_refused(tmp_path):
    run = tmp_path / "r"
    X, y = interrupted_run(run)
    other = xpnet.MLP([20, 8, 3], seed=5)
    other.save(run / "model.safetensors")  # killed after the model, before its checkpoint
    with pytest.raises(ValueError, match="does not go with the weights in"):
        resume(run)


# -- what `xpnet runs` prints, pinned: made-up run folders, every character checked ---------------

def hand_written_run(folder, *, lr, epochs, metrics, started, summary=None, layers=None):
    """A run folder written by hand, as RunRecorder lays it out (the model file's bytes are not read)."""
    folder.mkdir(parents=True)
    layers = layers or [{"type": "Dense", "units": 16}, {"type": "Dense", "units": 10}]
    config = {"name": folder.name, "started": started,
              "model": {"layers": layers, "input_shape": [784], "seed": 0},
              "fit": {"epochs": epochs, "batch_size": 64, "optimizer": "Adam(b1=0.9)", "lr": lr}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (folder / "model.safetensors").write_bytes(b"\0")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def made_up_runs(root):
    a = hand_written_run(
        root / "alpha", lr=0.001, epochs=2, started="2026-01-02T03:04:05.678+00:00",
        metrics=[{"epoch": 0, "loss": 0.5, "accuracy": 0.875, "val_loss": 0.625, "val_accuracy": 0.8125,
                  "seconds": 1.25},
                 {"epoch": 1, "loss": 0.25, "accuracy": 0.9375, "val_loss": 0.375, "val_accuracy": 0.90625,
                  "seconds": 1.5}],
        summary={"status": "completed", "warnings": []})
    b = hand_written_run(
        root / "beta", lr=0.01, epochs=3, started="2026-01-01T00:00:00.000+00:00",
        metrics=[{"epoch": 0, "loss": 2.5, "accuracy": 0.125, "seconds": 2.0}],
        summary={"status": "stopped early", "warnings": ["loss rose", "lr too high"]},
        layers=[{"type": "Conv2D", "filters": 6}, {"type": "Flatten"}, {"type": "Dense", "units": 10}])
    return a, b


def test_runs_are_listed_oldest_first_in_a_pinned_table(tmp_path):
    made_up_runs(tmp_path)
    runs = list_runs(tmp_path)
    assert [r["name"] for r in runs] == ["beta", "alpha"]  # by start time, not by name
    alpha = runs[1]
    assert alpha["best_val_accuracy"] == 0.90625 and alpha["final_accuracy"] == 0.9375
    assert alpha["seconds"] == 2.75 and alpha["epochs"] == "2/2" and alpha["optimizer"] == "Adam"
    assert runs[0]["best_val_accuracy"] is None and runs[0]["warnings"] == ["loss rose", "lr too high"]
    assert format_runs_table(runs) == textwrap.dedent("""\
        name   layers                   optimizer  lr     batch  epochs  best val acc  train time  started              status
        -----  -----------------------  ---------  -----  -----  ------  ------------  ----------  -------------------  --------------------------
        beta   Conv2D6-Flatten-Dense10  Adam       0.01   64     1/3     -             2.0 s       2026-01-01 00:00:00  stopped early (2 warnings)
        alpha  Dense16-Dense10          Adam       0.001  64     2/2     90.62%        2.8 s       2026-01-02 03:04:05  completed""")
    assert format_runs_table([]) == "no runs recorded"


def test_two_runs_are_compared_in_a_pinned_text(tmp_path):
    a, b = made_up_runs(tmp_path)
    (b / "summary.json").write_text(json.dumps({"status": "completed", "warnings": ["loss rose"]}))
    comparison = compare_runs(a, b)
    # differences first, then the rest; each part by key; the runs' own names and start times kept
    assert [key for key, _, _ in comparison["config"]] == [
        "fit.epochs", "fit.lr", "model.layers", "name", "started",
        "fit.batch_size", "fit.optimizer", "model.input_shape", "model.seed"]
    assert comparison["config"][1] == ("fit.lr", 0.001, 0.01)
    assert [(e, ma is None, mb is None) for e, ma, mb in comparison["metrics"]] == [(0, False, False), (1, False, True)]
    assert format_comparison(comparison) == textwrap.dedent("""\
        config (* = differs)
           key                alpha                                                         beta
        -  -----------------  ------------------------------------------------------------  ------------------------------------------------------------
        *  fit.epochs         2                                                             3
        *  fit.lr             0.001                                                         0.01
        *  model.layers       [{"type": "Dense", "units": 16}, {"type": "Dense", "units...  [{"type": "Conv2D", "filters": 6}, {"type": "Flatten"}, {...
           fit.batch_size     64                                                            64
           fit.optimizer      Adam(b1=0.9)                                                  Adam(b1=0.9)
           model.input_shape  [784]                                                         [784]
           model.seed         0                                                             0

        metrics per epoch (A = alpha, B = beta)
        epoch  loss A  loss B  accuracy A  accuracy B  val_loss A  val_loss B  val_accuracy A  val_accuracy B  seconds A  seconds B
        -----  ------  ------  ----------  ----------  ----------  ----------  --------------  --------------  ---------  ---------
        1      0.5     2.5     0.875       0.125       0.625       -           0.8125          -               1.25       2
        2      0.25            0.9375                  0.375                   0.9062                          1.5

        best val accuracy: A 90.62%, B -; status: A completed, B completed (1 warning)
        warning (B): loss rose""")


def test_a_resumed_run_records_the_resumption_and_keeps_its_clock(tmp_path):
    run = tmp_path / "r"
    interrupted_run(run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines[0]["elapsed"], lines[1]["elapsed"] = 500.0, 1000.0  # a run that had trained for 1000 s
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (run / "summary.json").unlink()  # as a killed run leaves its folder

    X, y = tiny_data()
    with pytest.raises(KeyboardInterrupt):
        xpnet.MLP([20, 8, 3], seed=0).fit(
            X, y, epochs=4, verbose=0, optimizer="adam",
            callbacks=[RunRecorder(run, plots=False, resume=True, config={"host": "second"}), InterruptAfter(2)])
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert 1000.0 <= metrics[2]["elapsed"] < 1060.0  # the clock goes on from the last recorded epoch
    config_text = (run / "config.json").read_text()
    config = json.loads(config_text)
    assert config_text == json.dumps(config, indent=2) + "\n"  # the layout the file always has
    (entry,) = config["resumed"]
    assert entry.keys() == {"started", "from_epoch", "backend", "host"}
    assert entry["from_epoch"] == 2 and entry["backend"] == "cpu" and entry["host"] == "second"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_run"] == 3 and summary["model_epoch"] == 2
    assert 1000.0 <= summary["seconds"] < 1060.0

    resume(run)  # a second resumption is added to the first
    config = json.loads((run / "config.json").read_text())
    assert [e["from_epoch"] for e in config["resumed"]] == [2, 3]
    assert read_run(run)["status"] == "completed" and [m["epoch"] for m in read_metrics(run)] == [0, 1, 2, 3]


def test_resume_names_what_differs_and_what_is_missing(tmp_path):
    run = tmp_path / "r"
    interrupted_run(run)
    config = json.loads((run / "config.json").read_text())
    del config["fit"]["batch_size"]  # a setting the record lacks is a difference too
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"other settings \(fit.batch_size was None, now 128\)"):
        resume(run)
    config["fit"]["batch_size"] = 128
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="other settings") as caught:
        resume(run, lr=0.5, batch_size=64, schedule="cosine", weight_decay=0.5)
    assert str(caught.value).split("other settings (")[1].count(", now ") == 3  # at most three named


def test_resume_refuses_a_run_with_no_epoch_or_no_checkpoint_naming_the_file(tmp_path):
    from xpnet.io import CHECKPOINT_FORMATS, read_model_file, write_model_file

    run = tmp_path / "r"
    interrupted_run(run)
    checkpoint = run / "checkpoint.safetensors"
    tensors, meta = read_model_file(checkpoint, formats=CHECKPOINT_FORMATS)
    write_model_file(checkpoint, tensors, {k: v for k, v in meta.items() if k != "epoch"})
    with pytest.raises(ValueError, match=r"checkpoint.safetensors holds epoch 0 but metrics.jsonl ends at epoch 2 "):
        resume(run)
    checkpoint.unlink()
    with pytest.raises(FileNotFoundError, match=rf"^{checkpoint} is missing, so the run cannot be resumed$"):
        resume(run)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=rf"^{run} finished no epoch: there is nothing to resume"):
        resume(run)


@pytest.mark.parametrize("shape, images", [
    ((5, 28, 28), True), ((5, 28, 28, 1), True), ((5, 8, 8, 3), True), ((5, 784), True), ((5, 9), True),
    ((5, 785), False), ((5, 20), False), ((5, 3), False), ((5,), False),
])
def test_the_worst_misclassified_plot_is_drawn_only_for_images(shape, images):
    from xpnet.runs import _images

    assert _images(np.zeros(shape)) is images


def test_an_unreadable_claim_names_no_holder(tmp_path):
    from xpnet.runs import _lock_owner

    for text in ("[1, 2]", "not json", '"a string"'):
        (tmp_path / "run.lock").write_text(text)
        assert _lock_owner(tmp_path) == {}
    (tmp_path / "run.lock").write_text('{"pid": 7}')
    assert _lock_owner(tmp_path) == {"pid": 7}


def test_runs_without_a_summary_or_an_epoch_and_damaged_ones_are_listed(tmp_path, monkeypatch, capsys):
    a, b = made_up_runs(tmp_path / "runs")
    (b / "summary.json").unlink()
    quiet = hand_written_run(tmp_path / "runs" / "gamma", lr=0.1, epochs=1, metrics=[],
                             started="2026-01-03T00:00:00.000+00:00", layers=[{"type": "Dense", "units": 3}])
    (quiet / "model.safetensors").unlink()
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "config.json").write_text("{")
    (tmp_path / "runs" / "broken" / "metrics.jsonl").write_text("")
    runs = list_runs(tmp_path / "runs")
    assert [(r["name"], r.get("status")) for r in runs] == [
        ("beta", "running or killed"), ("alpha", "completed"), ("gamma", "no epoch finished"), ("broken", None)]
    assert runs[-1]["path"] == str(tmp_path / "runs" / "broken") and "config.json" in runs[-1]["error"]

    monkeypatch.chdir(tmp_path)  # both default to ./runs
    assert [(r["name"], r["path"]) for r in list_runs()] == [(r["name"], f"runs/{r['name']}") for r in runs]
    assert cli_runs(types.SimpleNamespace(dir=None)) == 0
    assert capsys.readouterr().out.strip() == format_runs_table(list_runs())
    assert format_runs_table(runs[-1:]) == f"broken: unreadable: {runs[-1]['error']}"  # no table of no runs

    comparison = compare_runs(b, quiet)
    assert ("model.input_shape", [784], [784]) in comparison["config"]
    config = json.loads((quiet / "config.json").read_text())
    config["data"] = {"sha256": "abc"}  # a key one run has and the other lacks
    (quiet / "config.json").write_text(json.dumps(config))
    comparison = compare_runs(b, quiet)
    assert ("data.sha256", None, "abc") in comparison["config"]
    text = format_comparison(comparison)
    assert "val_loss" not in text and "seconds A  seconds B" in text  # only the metrics some epoch has
    assert text.splitlines()[-1] == "best val accuracy: A -, B -; status: A running or killed, B no epoch finished"
    text = format_comparison(compare_runs(quiet, a))
    assert "best val accuracy: A -, B 90.62%;" in text


def test_a_new_run_writes_this_config_and_claim(tmp_path):
    import platform
    import socket

    started_recorder(tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert list(config) == ["name", "started", "model", "n_params", "backend", "fit", "versions", "platform"]
    assert config["name"] == "r" and config["n_params"] == 20 * 8 + 8 + 8 * 3 + 3 and config["backend"] == "cpu"
    assert config["platform"] == {"machine": platform.machine(), "system": platform.system(),
                                  "processor": platform.processor()}
    assert config["versions"]["xpnet"] == xpnet.__version__
    owner = json.loads((tmp_path / "r" / "run.lock").read_text())
    assert owner.keys() == {"pid", "host", "started"}
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()


def test_a_folder_with_only_a_metrics_file_is_a_run_too(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="already holds a recorded run"):
        RunRecorder(tmp_path / "r").claim()


def test_recorder_arguments_are_checked_where_given():
    with pytest.raises(TypeError, match=r"^config must be a dict, got list$"):
        RunRecorder("r", config=[1])
    with pytest.raises(ValueError, match=r"^eval_data must be a pair \(X, y\)$"):
        RunRecorder("r", eval_data=(1, 2, 3))
    with pytest.raises(ValueError, match=r"^overwrite replaces the run in the folder, resume continues it: not both$"):
        RunRecorder("r", overwrite=True, resume=True)


def test_versions_name_the_installed_libraries_a_result_depends_on():
    from importlib import metadata

    from xpnet.runs import versions

    got = versions()
    for package in ("numba", "array-api-compat", "safetensors"):
        assert got[package] == metadata.version(package)
    assert got["numpy"] == np.__version__ and got["xpnet"] == xpnet.__version__


def test_a_finished_run_writes_this_summary(tmp_path):
    recorder = started_recorder(tmp_path / "r", eval_data=tiny_data(30))
    recorder.on_train_end({"epochs_run": 1, "warnings": ["w"]})
    text = (tmp_path / "r" / "summary.json").read_text()
    summary = json.loads(text)
    assert text == json.dumps(summary, indent=2) + "\n"
    assert list(summary) == ["status", "epochs_run", "model_epoch", "warnings", "finished", "seconds",
                             "eval_accuracy", "eval_size"]
    assert summary["status"] == "interrupted" and summary["model_epoch"] == 0 and summary["eval_size"] == 30
    assert summary["seconds"] == round(summary["seconds"], 3) and summary["warnings"] == ["w"]


def test_a_folder_in_use_names_its_holder(tmp_path):
    import socket

    holder = started_recorder(tmp_path / "r")
    started = json.loads((tmp_path / "r" / "run.lock").read_text())["started"]
    try:
        with pytest.raises(FileExistsError) as caught:
            RunRecorder(tmp_path / "r", overwrite=True).claim()
    finally:
        holder.release()
    assert f"(pid {os.getpid()} on {socket.gethostname()}, started {started})" in str(caught.value)


def test_read_run_names_a_damaged_config_field_and_fills_in_missing_ones(tmp_path):
    run = hand_written_run(tmp_path / "r", lr=0.1, epochs=2, metrics=[], started="2026-01-01T00:00:00.000+00:00")
    config = json.loads((run / "config.json").read_text())
    bare = {**config, "fit": {}}
    (run / "config.json").write_text(json.dumps(bare))
    got = read_run(run)
    assert got["optimizer"] == "?" and got["epochs"] == "0/?" and got["summary"] is None
    for key, value, where in (("model", {"layers": 3}, "'model.layers'"), ("started", 5, "'started'"),
                              ("model", [], "'model'")):
        (run / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=rf"config.json: {where}"):
            read_run(run)


# --- reading back: each figure's type, and how values are shown --------------------------------


@pytest.mark.parametrize("key", ["loss", "accuracy", "val_loss", "val_accuracy", "seconds"])
def test_each_figure_of_a_metrics_line_must_be_a_number(tmp_path, key):
    good = {"epoch": 0, "loss": 1.0, "accuracy": 0.5, "val_loss": None, "val_accuracy": 0.25, "seconds": 2}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, key: [1]}) + "\n")
    with pytest.raises(ValueError, match=rf"metrics\.jsonl, line 2: '{key}' is not a number: \[1\]$"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(good) + "\n")
    assert read_metrics(tmp_path) == [good]  # null, int and float figures are numbers enough


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": \n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        read_metrics(tmp_path)


def test_a_wrong_value_is_shown_whole_up_to_40_characters_then_cut(tmp_path):
    from xpnet.runs import _expect

    forty = "x" * 38  # 40 characters once quoted
    with pytest.raises(ValueError, match=rf'^here is not a number: "{forty}"$'):
        _expect(forty, (int, float), "here")
    with pytest.raises(ValueError, match=rf'^here is not a number: "{forty[:36]}\.\.\.$'):
        _expect(forty + "y", (int, float), "here")
    assert _expect(None, dict, "here") is None and _expect([1], list, "here") == [1]


def test_architecture_names_layers_by_type_and_size():
    from xpnet.runs import _architecture

    config = {"layers": [{"type": "Conv2D", "filters": 6}, {"type": "Flatten"}, {"units": 10}, 784]}
    assert _architecture(config) == "Conv2D6-Flatten-?10-784"
    assert _architecture({}) == _architecture({"layers": None}) == ""


def test_a_table_value_is_a_dash_json_or_four_digits_and_at_most_60_characters():
    from xpnet.runs import _value

    assert _value(None) == "-" and _value([1, 2]) == "[1, 2]" and _value({"a": 1}) == '{"a": 1}'
    assert _value(0.123456) == "0.1235" and _value(3) == "3" and _value("adam") == "adam"
    assert _value("y" * 60) == "y" * 60 and _value("y" * 61) == "y" * 57 + "..."


def test_elapsed_and_seconds_are_rounded_to_milliseconds(tmp_path, monkeypatch):
    import xpnet.runs as runs

    clock = iter([1000.0, 1001.23456789, 1002.5004999, 1003.0])
    monkeypatch.setattr(runs.time, "time", lambda: next(clock, 1003.0))
    recorder = runs.RunRecorder(tmp_path / "r")
    recorder.model = xpnet.MLP([4, 3], seed=0)
    recorder.on_train_begin({"epochs": 2})
    recorder.on_epoch_end(0, {"loss": 1.0})
    recorder.on_epoch_end(1, {"loss": 0.5})
    assert [m["elapsed"] for m in read_metrics(tmp_path / "r")] == [1.235, 2.5]
