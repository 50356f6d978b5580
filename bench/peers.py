"""xpnet ``fit`` on the GPU against the compiled peers, on the same GPU in the same run; the
peers' trainers (``TorchGraphEpoch``, ``JaxScanEpoch``) also serve the CPU training benchmark.

Two recipes on MNIST (60,000 train / 10,000 test images scaled to [0, 1], float32, batch 128,
every image once per epoch in a fresh random order, the last batch 96 images), each model
starting from the initial weights of ``xpnet.MLP(widths, seed=s)``, seeds 0..S-1:

- ``784-50-25-10``: plain SGD lr 0.1, 10 epochs; training seconds and final test accuracy;
- ``784-256-128-10``: Adam lr 1e-3 until the test accuracy after an epoch reaches 98% (at most
  20 epochs); training seconds with the evaluations left out.

Implementations (each reads the epoch's summed loss and correct count once per epoch, as
``fit`` does):

- ``xpnet``: ``MLP(widths, seed, backend="cuda").fit(...)`` as users call it, data on the GPU;
  its graph capture happens inside every call and is timed;
- ``torch-graph``: PyTorch with a whole epoch (469 steps: gather, forward, loss, backward and a
  fused optimizer step) captured by hand as one CUDA graph (``torch.cuda.graph``), replayed once
  per epoch after the epoch's permutation is copied into its static index buffer. The capture is
  made once per recipe before timing and reused across seeds (weights and optimizer state are
  reset in place), so it is not timed;
- ``jax-scan``: JAX ``jit`` of a whole epoch (the permutation, ``lax.scan`` over the full
  batches, then the last batch) as one XLA program, optax's ``sgd``/``adam``, compiled before
  timing; ``jax-scan-highest`` the same with ``precision=HIGHEST`` products (full float32; the
  default may use TF32 on this GPU, which xpnet and PyTorch here do not).

Every timed run is preceded by a warm-up run of the same kind (compilation, CUDA init).

    python3 bench/peers.py --seeds 3 --out bench/results/cuda-H200-peers.json   # a GPU
    python3 bench/peers.py --smoke      # CPU: the peers' code on 2,048 images, no timing claims
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with CuPy and torch

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import xpnet  # noqa: E402

BATCH = 128
RECIPES = {
    "784-50-25-10 SGD lr 0.1, 10 epochs": {"widths": [784, 50, 25, 10], "optimizer": "sgd", "lr": 0.1,
                                           "epochs": 10, "target": None},
    "784-256-128-10 Adam lr 1e-3, to 98% test accuracy": {"widths": [784, 256, 128, 10], "optimizer": "adam",
                                                          "lr": 1e-3, "epochs": 20, "target": 0.98},
}


def load_host(limit=None):
    from xpnet.datasets import load_mnist

    root = os.environ.get("XPNET_DATA")
    root = Path(root) / "mnist" if root else None
    out = []
    for split in ("train", "test"):
        X, y = load_mnist(split, root=root)
        X = (X.reshape(len(X), -1).astype(np.float32) / np.float32(255))[:limit]
        out += [np.ascontiguousarray(X), y.astype(np.int64)[:limit]]
    return out


class Clock:
    """Training seconds with evaluations left out: ``lap()`` after each epoch's metrics were read
    (the read synchronised the device), ``resume()`` after the evaluation."""

    def __init__(self):
        self.seconds, self.mark = 0.0, time.perf_counter()

    def lap(self):
        self.seconds += time.perf_counter() - self.mark

    def resume(self):
        self.mark = time.perf_counter()


def train(trainer, recipe, seed):
    """Epochs of ``trainer`` until the recipe's epochs or target: seconds, accuracies, epochs."""
    trainer.reset(seed)
    accuracies = []
    clock = Clock()
    for epochs in range(1, recipe["epochs"] + 1):
        trainer.epoch()  # returns host numbers: synchronised
        if recipe["target"] is None:
            continue
        clock.lap()
        accuracies.append(trainer.test_accuracy())
        clock.resume()
        if accuracies[-1] >= recipe["target"]:
            break
    if recipe["target"] is None:
        clock.lap()
        accuracies.append(trainer.test_accuracy())
    return {"seconds": clock.seconds, "test_accuracy": accuracies[-1], "epochs": epochs,
            "test_accuracy_per_epoch": accuracies}


# --- xpnet ---------------------------------------------------------------------------------------


def xpnet_run(recipe, host, seed):
    """``fit`` as users call it; the target is checked by a callback whose evaluation is not timed."""
    import cupy

    from xpnet.callbacks import Callback

    Xtr, ytr, Xte, yte = host
    Xtr_d, ytr_d, Xte_d = cupy.asarray(Xtr), cupy.asarray(ytr), cupy.asarray(Xte)
    accuracies = []

    class StopAtTarget(Callback):
        def on_epoch_end(self, epoch, logs):
            clock.lap()
            accuracies.append(self.model.score(Xte_d, yte))
            clock.resume()
            if accuracies[-1] >= recipe["target"]:
                self.model.stop_training = True

    model = xpnet.MLP(recipe["widths"], seed=seed, backend="cuda")
    callbacks = [StopAtTarget()] if recipe["target"] is not None else []
    cupy.cuda.get_current_stream().synchronize()
    clock = Clock()
    history = model.fit(Xtr_d, ytr_d, epochs=recipe["epochs"], batch_size=BATCH, optimizer=recipe["optimizer"],
                        lr=recipe["lr"], callbacks=callbacks, verbose=0)
    if recipe["target"] is None:
        cupy.cuda.get_current_stream().synchronize()
        clock.lap()
        accuracies.append(model.score(Xte_d, yte))
    return {"seconds": clock.seconds, "test_accuracy": accuracies[-1], "epochs": len(history.history["loss"]),
            "test_accuracy_per_epoch": accuracies}


# --- PyTorch, an epoch per CUDA graph -------------------------------------------------------------


class TorchGraphEpoch:
    """A whole epoch captured once as a CUDA graph (on the CPU, ``smoke``: the same steps eagerly)."""

    def __init__(self, recipe, host, device="cuda"):
        import torch

        self.torch, self.device, self.recipe = torch, device, recipe
        self.Xtr, self.ytr, self.Xte, self.yte = (torch.as_tensor(a, device=device) for a in host)
        widths = recipe["widths"]
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(widths) - 2 else [])
        self.net = torch.nn.Sequential(*layers).to(device)
        self.linears = [m for m in self.net if isinstance(m, torch.nn.Linear)]
        params = list(self.net.parameters())
        kind = torch.optim.SGD if recipe["optimizer"] == "sgd" else torch.optim.Adam
        extra = {"capturable": True} if kind is torch.optim.Adam and device == "cuda" else {}
        self.fused = device == "cuda"
        self.opt = kind(params, lr=recipe["lr"], fused=self.fused or None, **extra)
        n = self.Xtr.shape[0]
        self.perm = torch.arange(n, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.graph = None
        if device == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up steps: gradients and optimizer state exist
                for lo in (0, BATCH, 2 * BATCH):
                    self._step(lo)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._epoch_body()
            torch.cuda.synchronize()

    def _step(self, lo):
        torch = self.torch
        idx = self.perm[lo: lo + BATCH]
        xb, yb = self.Xtr.index_select(0, idx), self.ytr.index_select(0, idx)
        logits = self.net(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.loss_sum += loss.detach() * yb.shape[0]
            self.correct += (logits.argmax(1) == yb).sum()

    def _epoch_body(self):
        self.loss_sum.zero_()
        self.correct.zero_()
        for lo in range(0, self.Xtr.shape[0], BATCH):
            self._step(lo)

    def reset(self, seed):
        torch = self.torch
        init = xpnet.MLP(self.recipe["widths"], seed=seed).get_weights()
        with torch.no_grad():
            for lin, (W, b) in zip(self.linears, init):
                lin.weight.copy_(torch.as_tensor(W.T))
                lin.bias.copy_(torch.as_tensor(b))
            for state in self.opt.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def epoch(self):
        n = self.Xtr.shape[0]
        self.perm.copy_(self.torch.randperm(n, device=self.device, generator=self.generator))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._epoch_body()
        return float(self.loss_sum) / n, int(self.correct) / n

    def test_accuracy(self):
        with self.torch.no_grad():
            return (self.net(self.Xte).argmax(1) == self.yte).float().mean().item()


# --- JAX, an epoch per XLA program -----------------------------------------------------------------


class JaxScanEpoch:
    """A whole epoch as one jitted program: permutation, ``lax.scan`` over full batches, last batch."""

    def __init__(self, recipe, host, precision=None):
        import jax
        import jax.numpy as jnp
        import optax

        self.jax, self.recipe = jax, recipe
        self.Xtr, self.ytr, self.Xte, self.yte = (jax.device_put(a) for a in host)
        tx = optax.sgd(recipe["lr"]) if recipe["optimizer"] == "sgd" else optax.adam(recipe["lr"])
        self.tx = tx
        n = int(self.Xtr.shape[0])
        full = n // BATCH

        def forward(params, x):
            for i, (W, b) in enumerate(params):
                x = jnp.dot(x, W, precision=precision) + b
                if i < len(params) - 1:
                    x = jax.nn.relu(x)
            return x

        def loss_fn(params, x, y):
            logits = forward(params, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        def step(X, y, carry, idx):
            params, opt_state, loss_sum, correct = carry
            xb, yb = X[idx], y[idx]
            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, xb, yb)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            hits = jnp.sum(jnp.argmax(logits, axis=1) == yb).astype(jnp.int32)
            return params, opt_state, loss_sum + loss * idx.shape[0], correct + hits

        def epoch(params, opt_state, key, X, y):
            perm = jax.random.permutation(key, n)
            carry = (params, opt_state, jnp.float32(0), jnp.int32(0))
            carry, _ = jax.lax.scan(lambda c, idx: (step(X, y, c, idx), None), carry,
                                    perm[: full * BATCH].reshape(full, BATCH))
            if n > full * BATCH:
                carry = step(X, y, carry, perm[full * BATCH:])
            return carry

        self._epoch = jax.jit(epoch, donate_argnums=(0, 1))
        self._predict = jax.jit(lambda params, X: jnp.argmax(forward(params, X), axis=1))

    def reset(self, seed):
        jax = self.jax
        init = xpnet.MLP(self.recipe["widths"], seed=seed).get_weights()
        self.params = [(jax.device_put(W), jax.device_put(b)) for W, b in init]
        self.opt_state = self.tx.init(self.params)
        self.key = jax.random.PRNGKey(seed)
        jax.block_until_ready(self.params)

    def epoch(self):
        self.key, sub = self.jax.random.split(self.key)
        self.params, self.opt_state, loss_sum, correct = self._epoch(self.params, self.opt_state, sub,
                                                                     self.Xtr, self.ytr)
        n = int(self.Xtr.shape[0])
        return float(loss_sum) / n, int(correct) / n

    def test_accuracy(self):
        return float(np.mean(np.asarray(self._predict(self.params, self.Xte)) == np.asarray(self.yte)))


# --- the report ----------------------------------------------------------------------------------


def environment() -> dict:
    info = {"python": platform.python_version(), "numpy": np.__version__, "host": platform.node()}
    for name in ("cupy", "torch", "jax", "jaxlib", "optax"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
            info["torch_cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = out.stdout.strip() or out.stderr.strip()
    except Exception as exc:  # say what could not be read rather than guess
        info["device_error"] = repr(exc)
    return info


def summarise(rows):
    secs = [r["seconds"] for r in rows]
    accs = [r["test_accuracy"] for r in rows]
    return {"seconds_median": statistics.median(secs), "seconds_min": min(secs), "seconds_max": max(secs),
            "test_accuracy_mean": statistics.mean(accs), "test_accuracy_min": min(accs),
            "test_accuracy_max": max(accs), "epochs": [r["epochs"] for r in rows]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--only", default="", help="comma-separated implementations to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="CPU, 2,048 images, 2 epochs: the peers' code runs")
    args = parser.parse_args(argv)
    host = load_host(2048 if args.smoke else None)
    report = {"environment": environment(), "command": " ".join(sys.argv), "batch_size": BATCH, "recipes": {}}
    print(json.dumps(report["environment"]), flush=True)

    makers = {
        "torch-graph": lambda r: TorchGraphEpoch(r, host, device="cpu" if args.smoke else "cuda"),
        "jax-scan": lambda r: JaxScanEpoch(r, host),
        "jax-scan-highest": lambda r: JaxScanEpoch(r, host, precision="highest"),
    }
    if not args.smoke:
        makers = {"xpnet": None, **makers}
    only = set(filter(None, args.only.split(",")))
    for title, recipe in RECIPES.items():
        if args.smoke:
            recipe = {**recipe, "epochs": 2, "target": None if recipe["target"] is None else 0.5}
        section = report["recipes"][title] = {}
        for name, make in makers.items():
            if only and name not in only:
                continue
            try:
                if name == "xpnet":
                    xpnet_run({**recipe, "epochs": 1, "target": None}, host, 0)  # warm-up: compile, CUDA init
                    rows = [xpnet_run(recipe, host, seed) for seed in range(args.seeds)]
                else:
                    start = time.perf_counter()
                    trainer = make(recipe)
                    train(trainer, {**recipe, "epochs": 1, "target": None}, 0)  # warm-up: compile
                    setup = time.perf_counter() - start
                    rows = [train(trainer, recipe, seed) for seed in range(args.seeds)]
                    rows[0]["setup_seconds_untimed"] = setup
                section[name] = {"runs": rows, "summary": summarise(rows)}
            except Exception:
                section[name] = {"error": traceback.format_exc()}
                print(section[name]["error"], flush=True)
            print(title, name, json.dumps(section[name].get("summary")), flush=True)
        best_peer = min((v["summary"]["seconds_median"], k) for k, v in section.items()
                        if k != "xpnet" and "summary" in v) if len(section) > 1 else None
        if best_peer and "summary" in section.get("xpnet", {}):
            section["xpnet_speedup_vs_best_peer"] = {"peer": best_peer[1],
                                                     "ratio": best_peer[0] / section["xpnet"]["summary"]["seconds_median"]}
            print(title, "xpnet vs", best_peer[1], round(section["xpnet_speedup_vs_best_peer"]["ratio"], 2), flush=True)
    text = json.dumps(report, indent=1)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    return report


if __name__ == "__main__":
    main()
