"""Where a training step's GPU time goes: every kernel of one epoch, timed by CUPTI (through
``torch.profiler``, which also sees CuPy's and XLA's launches), for xpnet's graph epoch and the
two compiled peers of ``peers.py``, on both of its networks.

Per implementation and network: the epoch's wall time per step, the kernels' summed time per
step (the rest is the gap between kernels: launch latency and dependencies), and each kernel's
time per step, largest first. One epoch each, after two warm-up epochs.

    python3 bench/cuda_step_profile.py --out bench/results/cuda-H200-step-profile.json   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from peers import BATCH, RECIPES, JaxScanEpoch, TorchGraphEpoch, environment, load_host  # noqa: E402

import xpnet  # noqa: E402


class XpnetGraphEpoch:
    """xpnet's graph trainer (what ``fit`` runs on CUDA), one epoch per call."""

    def __init__(self, recipe, host):
        import cupy

        from xpnet.kernels.cuda_graph import GraphTrainer
        from xpnet.optim import make_optimizer

        self.cupy = cupy
        self.X, self.y = cupy.asarray(host[0]), cupy.asarray(host[1])
        self.model = xpnet.MLP(recipe["widths"], seed=0, backend="cuda")
        self.trainer = GraphTrainer(self.model, make_optimizer(recipe["optimizer"], lr=recipe["lr"]),
                                    self.X, self.y, BATCH)

    def epoch(self):
        order = self.cupy.asarray(self.model._rng.permutation(int(self.X.shape[0])))
        loss_sum, correct = self.trainer.run_epoch(order)
        return float(loss_sum), int(correct)


def kernel_times(events, steps):
    """{kernel name: microseconds per step} and the summed kernel time per step, from CUPTI events."""
    per_name = defaultdict(float)
    for e in events:
        if e.device_type.name != "CUDA":
            continue
        per_name[e.name[:160]] += e.time_range.elapsed_us()
    ranked = dict(sorted(((k, v / steps) for k, v in per_name.items()), key=lambda kv: -kv[1]))
    return ranked, sum(ranked.values())


def profile_epoch(trainer, steps, sync):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        trainer.epoch()
    sync()
    start = time.perf_counter()
    trainer.epoch()
    sync()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainer.epoch()
        sync()
    ranked, busy = kernel_times(prof.events(), steps)
    return {"wall_us_per_step_unprofiled": wall / steps * 1e6, "kernel_us_per_step": busy,
            "kernels_per_step": sum(1 for e in prof.events() if e.device_type.name == "CUDA") / steps,
            "per_kernel_us_per_step": ranked}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default="", help="comma-separated implementations to profile (default: all)")
    args = parser.parse_args(argv)
    import torch

    host = load_host()
    steps = -(-len(host[0]) // BATCH)
    report = {"environment": environment(), "command": " ".join(sys.argv), "steps_per_epoch": steps, "profiles": {}}
    makers = {"xpnet": XpnetGraphEpoch, "torch-graph": TorchGraphEpoch, "jax-scan": JaxScanEpoch}
    only = set(filter(None, args.only.split(",")))
    makers = {name: make for name, make in makers.items() if not only or name in only}
    for title, recipe in RECIPES.items():
        for name, make in makers.items():
            key = f"{title} | {name}"
            try:
                trainer = make(recipe, host)
                if hasattr(trainer, "reset"):
                    trainer.reset(0)
                report["profiles"][key] = out = profile_epoch(trainer, steps, torch.cuda.synchronize)
                top = list(out["per_kernel_us_per_step"].items())[:6]
                print(key, round(out["wall_us_per_step_unprofiled"], 1), "us/step wall,",
                      round(out["kernel_us_per_step"], 1), "us/step in", round(out["kernels_per_step"], 1), "kernels;",
                      [(k[:60], round(v, 2)) for k, v in top], flush=True)
            except Exception:
                report["profiles"][key] = {"error": traceback.format_exc()}
                print(key, report["profiles"][key]["error"], flush=True)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
