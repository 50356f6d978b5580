"""Regenerate the pictures in docs/ from a real training run on the real MNIST.

    XPNET_DATA=../shared/data python docs/make_figures.py            # plots (a few minutes on a CPU)
    XPNET_DATA=../shared/data python docs/make_figures.py --browser  # and docs/draw.png

The run is recorded in runs/docs-784-256-128-10/ (config.json, metrics.jsonl, model, plots); its
plots and two pictures of the data are copied here. ``--browser`` runs tests/test_browser.py with
XPNET_UPDATE_DOCS=1, whose screenshot of the drawing page becomes docs/draw.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))

import xpnet  # noqa: E402
from xpnet import plots  # noqa: E402
from xpnet.datasets import dataset_hashes, load_mnist  # noqa: E402
from xpnet.runs import RunRecorder  # noqa: E402

LAYERS = [784, 256, 128, 10]
FIT = {"epochs": 10, "batch_size": 128, "optimizer": "adam", "lr": 1e-3}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--browser", action="store_true", help="also retake docs/draw.png in headless Chromium")
    parser.add_argument("--epochs", type=int, default=FIT["epochs"])
    args = parser.parse_args()

    X_train, y_train = load_mnist("train")
    X_test, y_test = load_mnist("test")
    plots.examples_per_class(X_train, y_train, path=DOCS / "examples_per_class.png")
    plots.mean_image_per_class(X_train, y_train, path=DOCS / "mean_image_per_class.png")

    run = ROOT / "runs" / ("docs-" + "-".join(map(str, LAYERS)))
    recorder = RunRecorder(run, config={"data": dataset_hashes(), "script": "docs/make_figures.py"},
                           eval_data=(X_test, y_test), overwrite=True)
    model = xpnet.MLP(LAYERS, seed=0)
    model.fit(X_train, y_train, **{**FIT, "epochs": args.epochs}, validation_data=(X_test, y_test),
              callbacks=[recorder], verbose=1)
    for name in ("curves.png", "confusion.png", "per_class_accuracy.png", "worst_misclassified.png"):
        shutil.copyfile(run / name, DOCS / name)
    print(f"test accuracy {model.score(X_test, y_test):.4f}; run recorded in {run}; pictures in {DOCS}")

    if args.browser:
        env = {**os.environ, "XPNET_UPDATE_DOCS": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_browser.py")],
                       cwd=ROOT, env=env, check=True)


if __name__ == "__main__":
    main()
