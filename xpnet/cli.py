"""The ``xpnet`` command: train and evaluate on MNIST, list runs, draw digits.

    xpnet train                       # seed 002's 784-50-25-10, batch 128, 10 epochs, SGD lr 0.1
    xpnet train --arch lenet5         # the LeNet-5 of seed 001's write-up, with its recipe
    xpnet train --layers 784,256,128,10 --optimizer adam --lr 1e-3 --out runs/big
    xpnet evaluate runs/big/model.safetensors
    xpnet export runs/big/model.safetensors --onnx big.onnx
    xpnet runs [DIR] | xpnet runs compare A B
    xpnet draw --model runs/big/model.safetensors
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path


def _layers(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.replace("-", ",").split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes widths such as 784,50,25,10, got {text!r}") from None
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--layers needs at least two positive widths, got {text!r}")
    return widths


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--port takes 0-65535 (0: any free port), got {text!r}")
    return port


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    from .recipes import ARCHS, RECIPES

    parser = argparse.ArgumentParser(prog="xpnet", description="A small, fast neural-network library on NumPy or CuPy.")
    parser.add_argument("--version", action="version", version=f"xpnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    recipes = "; ".join(f"{a}: " + ", ".join(f"{k} {v}" for k, v in r.items()) for a, r in RECIPES.items())
    train = sub.add_parser("train", help="train a model on MNIST and evaluate it on the test set",
                           description=f"Unset options take the architecture's recipe ({recipes}).")
    train.add_argument("--arch", default="mlp", choices=ARCHS, help="mlp (widths from --layers) or lenet5 (default: mlp)")
    train.add_argument("--backend", default="cpu", help="cpu, cuda or auto (default: cpu)")
    train.add_argument("--layers", type=_layers, default=None, help="MLP widths (default 784,50,25,10)")
    train.add_argument("--activation", default="relu", choices=["relu", "tanh", "sigmoid"])
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--optimizer", default=None, choices=["sgd", "adam", "adamw"])
    train.add_argument("--lr", type=float, default=None, help="default: the recipe's, else 0.1 for sgd, 1e-3 for adam(w)")
    train.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0: plain SGD)")
    train.add_argument("--nesterov", action="store_true", help="Nesterov momentum (needs --momentum)")
    train.add_argument("--weight-decay", type=float, default=None, help="default: 0 (0.01 for adamw)")
    train.add_argument("--schedule", default=None, choices=["constant", "cosine"])
    train.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--data", default=None, help="folder holding mnist/ (default: $XPNET_DATA, then the cache)")
    train.add_argument("--out", default=None, help="run folder for the model, config, metrics and plots "
                       "(default: runs/<arch>-<time>)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--on-divergence", default="warn", choices=["warn", "stop", "ignore"],
                       help="when the loss stays above the first epoch's or accuracy at chance for 3 epochs: "
                            "warn, stop training (exit status 1), or ignore (default: warn)")

    evaluate = sub.add_parser("evaluate", help="evaluate a saved model on MNIST")
    evaluate.add_argument("model", help="a model file written by xpnet train / MLP.save")
    evaluate.add_argument("--backend", default="cpu")
    evaluate.add_argument("--split", default="test", choices=["train", "test"])
    evaluate.add_argument("--data", default=None)

    export = sub.add_parser("export", help="write a saved model as an ONNX graph",
                            description="The graph takes float32 rows of the model's input shape (pixels scaled "
                            "to [0, 1]; channels-last images), any batch size, and outputs the class probabilities.")
    export.add_argument("model", help="a model file written by xpnet train / save")
    export.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX file to write (needs the onnx "
                        "package: pip install 'xpnet[onnx]')")

    runs = sub.add_parser("runs", help="list recorded runs, or compare two")
    runs.add_argument("dir", nargs="?", default="runs", help="folder of runs (default: runs)")
    runs.add_argument("compare", nargs="*", help=argparse.SUPPRESS)

    draw = sub.add_parser("draw", help="a local page where you draw a digit and watch the model guess")
    draw.add_argument("--model", default=None, help="model file (default: train or reuse a quick one)")
    draw.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    draw.add_argument("--port", type=_port, default=8000, help="0-65535; 0 picks a free one (default: 8000)")
    draw.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                      help="also answer requests addressed to NAME (a name or address of this machine, no port), "
                      "for example when --host is 0.0.0.0; repeatable (default: only localhost and --host)")
    draw.add_argument("--no-browser", action="store_true", help="do not open a browser")
    return parser


def _mnist_root(data):
    return None if data is None else Path(data) / "mnist"


def _settings(args) -> dict:
    """The fit settings: each option given, else the architecture's recipe."""
    from .recipes import RECIPES

    recipe = dict(RECIPES[args.arch])
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
             "schedule": args.schedule}
    if args.optimizer is not None and args.optimizer != recipe["optimizer"] and args.lr is None:
        recipe["lr"] = 0.1 if args.optimizer == "sgd" else 1e-3  # the recipe's rate belongs to its optimizer
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


def cmd_train(args) -> int:
    from .datasets import dataset_hashes, load_mnist
    from .recipes import build
    from .runs import RunRecorder

    settings = _settings(args)
    model = build(args.arch, layers=args.layers, activation=args.activation, dtype=args.dtype, seed=args.seed,
                  backend=args.backend)
    out = Path(args.out) if args.out else _new_run_folder(args.arch)
    recorder = RunRecorder(out, config={"command": ["xpnet", *args.argv], "data": dataset_hashes()})
    recorder.claim()  # a folder in use fails now, not after loading the data
    X_train, y_train = load_mnist("train", root=_mnist_root(args.data))
    X_test, y_test = load_mnist("test", root=_mnist_root(args.data))
    recorder.eval_data = (X_test, y_test)
    print(f"{model}: {model.count_params():,} parameters", file=sys.stderr)
    history = model.fit(
        X_train,
        y_train,
        **settings,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        validation_data=(X_test, y_test),  # reported each epoch as val_*; no model selection uses it
        verbose=0 if args.quiet else 1,
        callbacks=[recorder],
        on_divergence=args.on_divergence,
    )
    seconds = sum(history["seconds"]) if history.epoch else 0.0  # epochs only: no plots, no saving
    scores = model.evaluate(X_test, y_test)
    print(f"test accuracy {scores['accuracy']:.4f}, test loss {scores['loss']:.4f}, "
          f"{len(history.epoch)} epochs in {seconds:.1f} s; saved in {out}")
    if history.diverged:
        print(f"xpnet train: stopped: {history.warnings[-1]}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args) -> int:
    from .datasets import load_mnist
    from .model import load

    model = load(args.model, backend=args.backend)
    X, y = load_mnist(args.split, root=_mnist_root(args.data))
    scores = model.evaluate(X, y)
    print(f"{args.split} accuracy {scores['accuracy']:.4f}, loss {scores['loss']:.4f} ({model})")
    return 0


def cmd_export(args) -> int:
    from .export import OPSET
    from .model import load

    model = load(args.model, backend="cpu")  # the graph is built from host copies of the weights
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

    if args.dir == "compare":
        if len(args.compare) != 2:
            raise SystemExit("usage: xpnet runs compare RUN_A RUN_B")
        args.dir, args.compare = None, list(args.compare)
    elif args.compare:
        raise SystemExit("usage: xpnet runs [DIR] | xpnet runs compare RUN_A RUN_B")
    else:
        args.compare = None
    return cli_runs(args) or 0


def cmd_draw(args) -> int:
    from .draw.server import cli_draw

    return cli_draw(args) or 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # recorded in a run's config.json
    command = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "runs": cmd_runs,
               "draw": cmd_draw}[args.command]
    try:
        return command(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"xpnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xpnet {args.command}: interrupted", file=sys.stderr)
        return 130
