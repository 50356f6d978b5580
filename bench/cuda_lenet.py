"""LeNet-5 on one GPU: xpnet ``fit`` against PyTorch, eager and with a whole epoch captured as a
CUDA graph, in one process, so every ratio compares runs on the same GPU seconds apart.

The write-up's network (``xpnet.recipes.lenet5``: two 3x3 ReLU convolutions with 2x2 average
pooling, dense 120-84-10; 60,074 parameters), MNIST, batch 128, Adam lr 1e-3, float32, all three
from the same initial weights (xpnet's, moved to PyTorch's NCHW layout):

- ``xpnet``: ``Sequential.fit`` on the GPU as users call it (CuPy; the CUDA graph path covers
  dense ReLU MLPs, so this network runs eagerly);
- ``torch-eager``: the same network and steps in PyTorch, data on the GPU, one launch per op;
- ``torch-graph``: PyTorch's whole epoch (gather, forward, loss, backward, fused Adam) captured once
  as a CUDA graph and replayed, built before the clock starts.

Each seed trains ``--epochs`` epochs after one untimed warm-up epoch (compilation, cuDNN's choice
of algorithms); the test accuracy after the last epoch is recorded so a run that stopped learning
shows. ``--smoke`` runs the same code on the CPU on 1,024 images (it checks the script, not speed).

``--profile`` instead trains xpnet one epoch (after a warm-up epoch) twice: under CUPTI (through
``torch.profiler``: the kernels per step, their summed time against the wall time, the largest)
and under cProfile (the host: the functions that take the most time of their own, CuPy's
included), to show where a step's time goes.

    python bench/cuda_lenet.py [--epochs 2] [--seeds 0 1 2] [--out bench/results/cuda-H100-lenet.json]
    python bench/cuda_lenet.py --profile [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from peers import environment, load_host
from xpnet.recipes import lenet5

BATCH, LR = 128, 1e-3


def torch_lenet(torch, seed, device):
    """PyTorch's LeNet-5 holding ``lenet5(seed=seed)``'s initial weights (Keras layout to NCHW)."""
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 3), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ).to(device)
    weights = lenet5(seed=seed).get_weights()
    conv1, conv2, dense1, dense2, dense3 = weights[0:2], weights[2:4], weights[4:6], weights[6:8], weights[8:10]
    # xpnet flattens (h, w, c), PyTorch (c, h, w): reorder the first dense kernel's rows to match
    dense1 = (dense1[0].reshape(5, 5, 16, 120).transpose(2, 0, 1, 3).reshape(400, 120), dense1[1])
    modules = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for module, (W, b) in zip(modules, (conv1, conv2, dense1, dense2, dense3)):
            W = W.transpose(3, 2, 0, 1) if W.ndim == 4 else W.T
            module.weight.copy_(torch.as_tensor(np.ascontiguousarray(W)))
            module.bias.copy_(torch.as_tensor(b))
    return net


class TorchLeNet:
    """PyTorch's epoch, eager or (``graph=True``, CUDA only) captured once and replayed."""

    def __init__(self, host, device, graph):
        import torch

        self.torch, self.device = torch, device
        Xtr, ytr, Xte, yte = host
        self.Xtr = torch.as_tensor(Xtr.reshape(-1, 1, 28, 28), device=device)
        self.ytr, self.yte = torch.as_tensor(ytr, device=device), torch.as_tensor(yte, device=device)
        self.Xte = torch.as_tensor(Xte.reshape(-1, 1, 28, 28), device=device)
        self.perm = torch.arange(self.Xtr.shape[0], device=device)
        self.graph_wanted = graph

    def reset(self, seed):
        torch = self.torch
        self.net = torch_lenet(torch, seed, self.device)
        cuda = self.device == "cuda"
        extra = {"capturable": True} if self.graph_wanted else {}
        self.opt = torch.optim.Adam(self.net.parameters(), lr=LR, fused=cuda or None, **extra)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.graph = None
        if self.graph_wanted:  # warm-up steps on a side stream, then the capture (untimed)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for lo in (0, BATCH, 2 * BATCH):
                    self._step(lo)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._epoch_body()
            # the warm-up steps moved the weights: start from the seed's weights again
            fresh = torch_lenet(torch, seed, self.device)
            with torch.no_grad():
                for p, q in zip(self.net.parameters(), fresh.parameters()):
                    p.copy_(q)
                for state in self.opt.state.values():
                    for value in state.values():
                        if torch.is_tensor(value):
                            value.zero_()
        if cuda:
            torch.cuda.synchronize()

    def _step(self, lo):
        torch = self.torch
        idx = self.perm[lo: lo + BATCH]
        xb, yb = self.Xtr.index_select(0, idx), self.ytr.index_select(0, idx)
        loss = torch.nn.functional.cross_entropy(self.net(xb), yb)
        self.opt.zero_grad(set_to_none=not self.graph_wanted)
        loss.backward()
        self.opt.step()
        return loss

    def _epoch_body(self):
        for lo in range(0, self.Xtr.shape[0], BATCH):
            loss = self._step(lo)
        return loss

    def epoch(self):
        n = self.Xtr.shape[0]
        self.perm.copy_(self.torch.randperm(n, device=self.device, generator=self.generator))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._epoch_body()
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def test_accuracy(self):
        with self.torch.no_grad():
            return (self.net(self.Xte).argmax(1) == self.yte).float().mean().item()


class XpnetLeNet:
    """A fresh ``lenet5`` trained by one ``fit`` call of all the epochs, timed around the call."""

    def __init__(self, host, backend):
        self.backend = backend
        Xtr, ytr, Xte, yte = host
        if backend == "cuda":
            import cupy

            self.sync = cupy.cuda.get_current_stream().synchronize
            Xtr, ytr, Xte = cupy.asarray(Xtr), cupy.asarray(ytr), cupy.asarray(Xte)
        else:
            self.sync = lambda: None
        self.Xtr, self.ytr = Xtr.reshape(-1, 28, 28, 1), ytr
        self.Xte, self.yte = Xte.reshape(-1, 28, 28, 1), yte

    def run(self, seed, epochs):
        model = lenet5(seed=seed, backend=self.backend)
        self.sync()
        start = time.perf_counter()
        model.fit(self.Xtr, self.ytr, epochs=epochs, batch_size=BATCH, optimizer="adam", lr=LR, verbose=0)
        self.sync()
        return time.perf_counter() - start, model.score(self.Xte, self.yte)


def profile(runner, device):
    """Where xpnet's LeNet-5 epoch goes: kernels (CUDA only) and host functions."""
    import cProfile
    import io
    import pstats

    runner.run(0, 1)  # warm-up: compilation, the memory pool
    report = {}
    if device == "cuda":
        import torch
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as cupti

        from cuda_step_profile import kernel_times

        steps = -(-runner.Xtr.shape[0] // BATCH)
        with cupti(activities=[ProfilerActivity.CUDA]) as prof:
            seconds, _ = runner.run(0, 1)
        events = list(prof.events())
        per_kernel, kernel_us = kernel_times(events, steps)
        launches = sum(1 for e in events if e.device_type.name == "CUDA") / steps
        report["kernels"] = {"wall_us_per_step": seconds / steps * 1e6, "kernel_us_per_step": kernel_us,
                             "kernels_per_step": launches, "largest_us_per_step": dict(list(per_kernel.items())[:25])}
        print(json.dumps(report["kernels"], indent=1), flush=True)
        torch.cuda.synchronize()
    host = cProfile.Profile()
    host.enable()
    runner.run(0, 1)
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(40)
    report["host_tottime"] = text.getvalue()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(40)
    report["host_cumulative"] = text.getvalue()
    print(report["host_tottime"], report["host_cumulative"], sep="\n", flush=True)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", default="", help="comma-separated implementations (default: all)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--smoke", action="store_true", help="CPU, 1,024 images: the script runs")
    parser.add_argument("--profile", action="store_true", help="where xpnet's epoch goes, instead of the timings")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    host = load_host(1024 if args.smoke else None)
    report = {"environment": environment(), "command": " ".join(sys.argv), "batch_size": BATCH, "lr": LR,
              "epochs": args.epochs, "results": {}}
    print(json.dumps(report["environment"]), flush=True)
    if args.profile:
        report["profile"] = profile(XpnetLeNet(host, device), device)
        _write(report, args.out)
        return report
    makers = {"xpnet": lambda: XpnetLeNet(host, device),
              "torch-eager": lambda: TorchLeNet(host, device, graph=False),
              "torch-graph": lambda: TorchLeNet(host, device, graph=True)}
    if args.smoke:
        del makers["torch-graph"]
    only = set(filter(None, args.only.split(",")))
    for name, make in makers.items():
        if only and name not in only:
            continue
        runner, rows = make(), []
        for i, seed in enumerate([args.seeds[0], *args.seeds]):
            warm_up = i == 0  # one epoch, not kept
            epochs = 1 if warm_up else args.epochs
            if isinstance(runner, XpnetLeNet):
                seconds, accuracy = runner.run(seed, epochs)
            else:
                runner.reset(seed)
                start = time.perf_counter()
                for _ in range(epochs):
                    runner.epoch()
                seconds, accuracy = time.perf_counter() - start, runner.test_accuracy()
            if warm_up:
                continue
            rows.append({"seed": seed, "seconds": seconds, "seconds_per_epoch": seconds / epochs,
                         "test_accuracy": accuracy})
            print(name, json.dumps(rows[-1]), flush=True)
        per_epoch = [r["seconds_per_epoch"] for r in rows]
        report["results"][name] = {"runs": rows, "seconds_per_epoch_median": statistics.median(per_epoch),
                                   "test_accuracy_mean": statistics.mean(r["test_accuracy"] for r in rows)}
        _write(report, args.out)  # after each implementation, so a run cut short keeps what it measured
    results = report["results"]
    if "xpnet" in results:
        for peer in ("torch-eager", "torch-graph"):
            if peer in results:
                ratio = results[peer]["seconds_per_epoch_median"] / results["xpnet"]["seconds_per_epoch_median"]
                print(f"xpnet vs {peer}: {ratio:.2f}x", flush=True)
    return report


def _write(report, path):
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
