"""The ``xpnet`` command: train and evaluate on MNIST (or a data file), list runs, draw digits.

    xpnet train                       # 784-50-25-10, batch 128, 10 epochs, SGD lr 0.1
    xpnet train --arch lenet5         # the LeNet-5 of the Deep Learning from Scratch post
    xpnet train --arch cnn_shift      # a small CNN trained on randomly shifted digits
    xpnet train --layers 784,256,128,10 --optimizer adam --lr 1e-3 --out runs/big
    xpnet train --resume runs/big     # continue an interrupted run where it stopped
    xpnet train --data digits.npz     # x_train, y_train, x_test, y_test; or a CSV: label, features
    xpnet evaluate runs/big           # a run folder, or a model file
    xpnet export runs/big --onnx big.onnx
    xpnet runs [DIR] | xpnet runs compare A B
    xpnet draw --model runs/big

A mistake in the command (a bad option, a folder in use, data that is not there, no CuPy for
``--backend cuda``, ...) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np


def _layers(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.replace("-", ",").split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes widths such as 784,50,25,10, got {text!r}") from None
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--layers needs at least two positive widths, got {text!r}")
    return widths


def _number(kind, low, high=None, *, above=False):
    """An argparse type: a finite ``kind`` (int or float) in ``[low, high)`` (``(low, high)``
    with ``above``), so that a bad setting is refused before any data is loaded."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or value < low or (above and value == low)
                or (high is not None and value >= high)):
            bound = (f"> {low}" if above else f">= {low}") if high is None else f"in [{low}, {high})"
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"takes {what} {bound}, got {text!r}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--port takes 0-65535 (0: any free port), got {text!r}")
    return port


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line (argparse would print the usage first) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help: argparse's "(default: X)", or the help's own words where
    the default is not one value (the recipe's, $XPNET_BACKEND's)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .optim import DEFAULT_LR
    from .recipes import ARCHS, RECIPES

    parser = _Parser(prog="xpnet", description="A small, fast neural-network library on NumPy or CuPy.",
                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"xpnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    command = lambda name, **kw: sub.add_parser(name, formatter_class=_Help, **kw)  # noqa: E731
    backend = "cpu, cuda or auto (default: $XPNET_BACKEND, else cpu)"
    data = ("MNIST: a folder holding mnist/ (default: $XPNET_DATA, then the cache, downloading once); or a data "
            "file: FILE.npz with x_train, y_train and optionally x_test, y_test (as Keras's mnist.npz), or FILE.csv, "
            "a row per example: the label, then the features (an optional header line)")

    recipes = "; ".join(f"{a}: " + ", ".join(f"{k} {v}" for k, v in r.items()) for a, r in RECIPES.items())
    rates = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
    train = command("train", help="train a model on MNIST (or a data file) and evaluate it on the test set",
                    description=f"Unset options take the architecture's recipe ({recipes}). The run is recorded "
                    "in a folder (--out): model, checkpoint, config, metrics, plots.")
    train.add_argument("--arch", default="mlp", choices=ARCHS,
                       help="mlp (widths from --layers), lenet5, or cnn_shift (a small CNN trained on shifted images)")
    train.add_argument("--backend", default=None, help=backend)
    train.add_argument("--layers", type=_layers, default=None,
                       help="MLP widths (default: 784,50,25,10; with a data file, its features,50,25,its classes)")
    train.add_argument("--activation", default="relu", choices=["relu", "tanh", "sigmoid"],
                       help="the MLP's hidden layers'")
    train.add_argument("--epochs", type=_number(int, 0), default=None, help="default: the recipe's")
    train.add_argument("--batch-size", type=_number(int, 1), default=None, help="default: the recipe's")
    train.add_argument("--optimizer", default=None, choices=["sgd", "adam", "adamw"], help="default: the recipe's")
    train.add_argument("--lr", type=_number(float, 0, above=True), default=None,
                       help=f"default: the recipe's for its optimizer, else the optimizer's ({rates})")
    train.add_argument("--momentum", type=_number(float, 0, 1), default=None,
                       help="SGD momentum (default: 0, plain SGD)")
    train.add_argument("--nesterov", action="store_true", help="Nesterov momentum (needs --momentum)")
    train.add_argument("--weight-decay", type=_number(float, 0), default=None, help="default: 0 (0.01 for adamw)")
    train.add_argument("--schedule", default=None, choices=["constant", "cosine"], help="default: the recipe's")
    train.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="of weights and math")
    train.add_argument("--seed", type=_number(int, 0), default=0,
                       help="seeds the weights, shuffling, dropout and random shifts")
    train.add_argument("--data", default=None, help=data)
    train.add_argument("--test-data", default=None, metavar="FILE",
                       help="test rows for a --data file, in the same layout (default: the file's x_test, y_test; "
                       "a CSV has none, and then the run has no test set)")
    train.add_argument("--out", default=None, help="run folder for the model, config, metrics and plots "
                       "(default: runs/<arch>-<time>)")
    train.add_argument("--overwrite", action="store_true", help="replace the run already recorded in --out")
    train.add_argument("--resume", default=None, metavar="RUN",
                       help="continue the unfinished run in folder RUN with its own settings, from its last "
                       "finished epoch (only --quiet may be given with it; default: a new run)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--on-divergence", default="warn", choices=["warn", "stop", "ignore"],
                       help="when the loss stays above the first epoch's or accuracy at chance for 3 epochs: "
                            "warn, stop training (exit status 1), or ignore")

    evaluate = command("evaluate", help="evaluate a saved model on MNIST (or a data file)")
    evaluate.add_argument("model", help="a run folder, or a model file written by xpnet train / model.save")
    evaluate.add_argument("--backend", default=None, help=backend)
    evaluate.add_argument("--split", default="test", choices=["train", "test"], help="the rows to evaluate on")
    evaluate.add_argument("--data", default=None, help=data + " (default for a run folder: the data it was trained on)")

    export = command("export", help="write a saved model as an ONNX graph",
                     description="The graph takes float32 rows of the model's input shape (pixels scaled "
                     "to [0, 1]; channels-last images), any batch size, and outputs the class probabilities.")
    export.add_argument("model", help="a run folder, or a model file written by xpnet train / model.save")
    export.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX file to write (needs the onnx "
                        "package: pip install 'xpnet[onnx]')")

    runs = command("runs", help="list recorded runs (xpnet runs [DIR]), or compare two",
                   description="xpnet runs [DIR] lists the runs in DIR (default: runs), as xpnet runs list [DIR].")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="{list,compare}")
    listing = runs_sub.add_parser("list", help="list the runs in a folder (the default)", formatter_class=_Help)
    listing.add_argument("dir", nargs="?", default="runs", help="folder of runs")
    compare = runs_sub.add_parser("compare", help="two runs side by side: settings, then metrics per epoch",
                                  formatter_class=_Help)
    compare.add_argument("run_a", help="a run folder (A)")
    compare.add_argument("run_b", help="a run folder (B)")

    draw = command("draw", help="a local page where you draw a digit and watch the model guess")
    draw.add_argument("--model", default=None,
                      help="a run folder or model file (default: train a quick one once, then reuse it)")
    draw.add_argument("--host", default="127.0.0.1", help="address to listen on (localhost only)")
    draw.add_argument("--port", type=_port, default=8000, help="0-65535; 0 picks a free one")
    draw.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                      help="also answer requests addressed to NAME (a name or address of this machine, no port), "
                      "for example when --host is 0.0.0.0; repeatable (default: only localhost and --host)")
    draw.add_argument("--no-browser", action="store_true", help="do not open a browser")
    return parser


def _settings(args) -> dict:
    """The fit settings: each option given, else the architecture's recipe."""
    from .optim import DEFAULT_LR
    from .recipes import RECIPES

    recipe = dict(RECIPES[args.arch])
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
             "schedule": args.schedule}
    if args.optimizer is not None and args.optimizer != recipe["optimizer"] and args.lr is None:
        recipe["lr"] = DEFAULT_LR[args.optimizer]  # the recipe's rate belongs to its optimizer
    return {**recipe, **{k: v for k, v in given.items() if v is not None}}


def _new_run_folder(arch) -> Path:
    """A fresh ``runs/<arch>-<time>``, made here: ``mkdir`` is atomic, so a second run started
    in the same second gets ``-2`` (then ``-3``, ...) instead of the same folder."""
    base = Path("runs") / time.strftime(f"{arch}-%Y%m%d-%H%M%S")
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in itertools.count(1):
        out = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue


def _is_data_file(data) -> bool:
    """Whether ``--data`` names a data file (else a folder holding mnist/)."""
    return data is not None and (Path(data).suffix in (".npz", ".csv") or Path(data).is_file())


def _load_data(data, test_data=None):
    """``(X_train, y_train, X_test, y_test, hashes)`` from ``--data`` (an MNIST folder or a data
    file) and ``--test-data``; the test pair is None when there is no test set."""
    from .datasets import dataset_hashes, load_file, load_mnist

    if not _is_data_file(data):
        if test_data is not None:
            raise ValueError("--test-data goes with a --data FILE.npz or FILE.csv; MNIST has its own test set")
        root = None if data is None else Path(data) / "mnist"
        return (*load_mnist("train", root=root), *load_mnist("test", root=root), dataset_hashes())
    X, y, X_test, y_test = load_file(data)
    hashes = {str(data): _sha256(data)}
    if test_data is not None:
        if X_test is not None:
            raise ValueError(f"{data} holds its own test set (x_test, y_test): give no --test-data")
        X_test, y_test, _, _ = load_file(test_data)
        hashes[str(test_data)] = _sha256(test_data)
    return X, y, X_test, y_test, hashes


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _recorded_train_command(run, parser):
    """``(args, config)``: the ``xpnet train`` arguments run folder ``run`` recorded (data paths
    as that command meant them, from the folder it ran in), or None for a run recorded otherwise
    (``fit(run_dir=...)``), and its config."""
    from .runs import read_run

    config = read_run(run)["config"]
    command, cwd = config.get("command"), config.get("cwd")
    if not (isinstance(command, list) and command[:2] == ["xpnet", "train"] and isinstance(cwd, str)):
        return None, config
    recorded = parser.parse_args(command[1:])
    for name in ("data", "test_data"):
        if getattr(recorded, name) is not None:
            setattr(recorded, name, str(Path(cwd, getattr(recorded, name))))
    return recorded, config


def _resumed(args, parser):
    """The arguments of the run ``--resume RUN`` continues: its recorded command, read again."""
    run = Path(args.resume)
    defaults = vars(parser.parse_args(["train"]))
    extra = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
             if k not in ("resume", "quiet", "argv") and v != defaults.get(k)]
    if extra:
        raise ValueError(f"--resume continues {run} with its own settings: give no {', '.join(extra)}")
    from .runs import CONFIG

    if not (run / CONFIG).is_file():
        raise FileNotFoundError(f"{run} holds no recorded run to resume (no {CONFIG})")
    resumed, config = _recorded_train_command(run, parser)
    if resumed is None:
        raise ValueError(f"{run} was not recorded by xpnet train (its config.json has no train command and folder)")
    resumed.out, resumed.resume, resumed.quiet, resumed.overwrite = str(run), str(run), args.quiet, False
    resumed.recorded_data, resumed.argv = config.get("data"), args.argv
    return resumed


def cmd_train(args) -> int:
    from .distributed import MPICommunicator, failure_ends_the_job, launched_ranks

    # under mpiexec or srun, a rank that fails outside fit (a folder in use, data it cannot read)
    # ends the job: the others would wait for it in a collective call forever
    with failure_ends_the_job(MPICommunicator() if launched_ranks() > 1 else None):
        return _train(args)


def _train(args) -> int:
    from .backend import get_backend
    from .distributed import launched_rank
    from .runs import RunRecorder

    if args.resume:
        args = _resumed(args, _parser())
    backend = get_backend(args.backend)  # no CuPy for "cuda": said now, before any folder or data
    settings = _settings(args)
    # under mpiexec or srun every rank trains (fit finds the launcher); rank 0 alone records and prints
    if launched_rank() != 0:
        return _train_as_follower(args, backend, settings)
    out = Path(args.out) if args.out else _new_run_folder(args.arch)
    config = {"command": ["xpnet", *args.argv], "cwd": os.getcwd()}
    recorder = RunRecorder(out, config=config, overwrite=args.overwrite, resume=bool(args.resume))
    try:
        recorder.claim()  # a folder in use, or one holding a run, fails now, not after loading the data
        X_train, y_train, X_test, y_test, hashes = _load_data(args.data, args.test_data)
        if args.resume and sorted(hashes.values()) != sorted((args.recorded_data or {}).values()):
            raise ValueError(f"the data differ from those {out} was trained on (sha256 {args.recorded_data})")
        recorder.extra_config["data"] = hashes
        model = _model_for(args, backend, X_train, y_train, y_test)
        test = None if X_test is None else (X_test, y_test)
        recorder.eval_data = test
        print(f"{model}: {model.count_params():,} parameters", file=sys.stderr)
        history = model.fit(
            X_train,
            y_train,
            **settings,
            momentum=args.momentum,
            nesterov=args.nesterov,
            weight_decay=args.weight_decay,
            validation_data=test,  # reported each epoch as val_*; no model selection uses it
            verbose=0 if args.quiet else 1,
            callbacks=[recorder],
            on_divergence=args.on_divergence,
        )
    except BaseException:
        recorder.discard()  # a start that failed leaves no empty run folder
        raise
    seconds = sum(history["seconds"]) if history.epoch else 0.0  # epochs only: no plots, no saving
    scores, split = (model.evaluate(*test), "test") if test else (model.evaluate(X_train, y_train), "train")
    print(f"{split} accuracy {scores['accuracy']:.4f}, {split} loss {scores['loss']:.4f}, "
          f"{len(history.epoch)} epoch{'s' * (len(history.epoch) != 1)} in {seconds:.1f} s; saved in {out}")
    plots = (recorder.summary or {}).get("plots")
    if isinstance(plots, str):  # said in summary.json; said here too, with how to get them
        print("xpnet train: plots skipped: matplotlib is not installed (pip install 'xpnet[plot]')", file=sys.stderr)
    if history.diverged:
        print(f"xpnet train: stopped: {history.warnings[-1]}", file=sys.stderr)
        return 1
    return 0


def _model_for(args, backend, X_train, y_train, y_test):
    """The model ``xpnet train`` builds for these settings and data."""
    from .recipes import build

    layers = args.layers
    if layers is None and args.arch == "mlp" and _is_data_file(args.data):
        classes = int(max(y_train.max(), -1 if y_test is None else y_test.max())) + 1
        layers = [int(np.prod(X_train.shape[1:])), 50, 25, max(classes, 2)]
    return build(args.arch, layers=layers, activation=args.activation, dtype=args.dtype, seed=args.seed,
                 backend=backend)


def _train_as_follower(args, backend, settings) -> int:
    """A rank other than 0 of a distributed ``xpnet train``: the same training, silently, with no
    run folder; rank 0 records, prints and saves (and, resuming, reads the checkpoint, whose
    epoch and optimizer state ``fit`` hands to every rank). Its exit status is rank 0's."""
    X_train, y_train, X_test, y_test, _ = _load_data(args.data, args.test_data)
    model = _model_for(args, backend, X_train, y_train, y_test)
    test = None if X_test is None else (X_test, y_test)
    history = model.fit(X_train, y_train, **settings, momentum=args.momentum, nesterov=args.nesterov,
                        weight_decay=args.weight_decay, validation_data=test, verbose=0,
                        on_divergence=args.on_divergence)
    return 1 if history.diverged else 0


def _model_file(path) -> Path:
    """A model file, or the model.safetensors of a run folder."""
    from .runs import MODEL

    path = Path(path)
    if path.is_dir():
        if not (path / MODEL).is_file():
            raise FileNotFoundError(f"{path} holds no {MODEL} (a run folder has one once an epoch has finished)")
        return path / MODEL
    return path


def cmd_evaluate(args) -> int:
    from .model import load
    from .runs import CONFIG

    model = load(_model_file(args.model), backend=args.backend)
    data, test_data = args.data, None
    if data is None and Path(args.model).is_dir() and (Path(args.model) / CONFIG).is_file():
        recorded, _ = _recorded_train_command(Path(args.model), _parser())
        if recorded is not None:  # a run folder: the data it was trained and tested on
            data, test_data = recorded.data, recorded.test_data
    X_train, y_train, X_test, y_test, _ = _load_data(data, test_data)
    if args.split == "test" and X_test is None:
        raise ValueError(f"{data} holds no test set (x_test, y_test): use --split train")
    X, y = (X_test, y_test) if args.split == "test" else (X_train, y_train)
    scores = model.evaluate(X, y)
    where = "" if data is None else f" on {test_data if args.split == 'test' and test_data else data}"
    print(f"{args.split} accuracy {scores['accuracy']:.4f}, loss {scores['loss']:.4f} ({model}){where}")
    return 0


def cmd_export(args) -> int:
    from .export import OPSET
    from .model import load

    model = load(_model_file(args.model), backend="cpu")  # the graph is built from host copies of the weights
    try:
        model.export_onnx(args.onnx)
    except ImportError as exc:  # onnx is an optional extra: say how to get it, not a traceback
        print(f"xpnet export: error: {exc}", file=sys.stderr)
        return 2
    shape = ", ".join(map(str, ("N", *model.input_shape)))
    print(f"wrote {args.onnx}: ONNX opset {OPSET}, input float32 ({shape}) scaled to [0, 1], "
          f"output class probabilities (N, {model.n_classes})")
    return 0


def cmd_runs(args) -> int:
    from .runs import cli_runs

    if args.runs_command == "compare":
        args.compare = [args.run_a, args.run_b]
    else:
        args.compare, args.dir = None, getattr(args, "dir", "runs")
    return cli_runs(args) or 0


def cmd_draw(args) -> int:
    from .draw.server import cli_draw

    if args.model is not None:
        args.model = _model_file(args.model)
    return cli_draw(args) or 0


def main(argv=None) -> int:
    from .backend import BackendError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["runs"] and argv[1:2] and argv[1] not in ("list", "compare") and not argv[1].startswith("-"):
        argv = ["runs", "list", *argv[1:]]  # xpnet runs DIR: the listing, as before the subcommands
    args = _parser().parse_args(argv)
    args.argv = argv  # recorded in a run's config.json
    command = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "runs": cmd_runs,
               "draw": cmd_draw}[args.command]
    try:
        return command(args)
    except (ValueError, TypeError, OSError, ImportError, BackendError) as exc:
        message = " ".join(str(exc).splitlines()) or type(exc).__name__
        print(f"xpnet {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xpnet {args.command}: interrupted", file=sys.stderr)
        return 130
