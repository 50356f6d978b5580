"""Turn pytest-benchmark JSON from bench/ into markdown tables and a PNG plot.

    python bench/report.py bench/results/kernels.json bench/results/training.json \
        --markdown bench/results/report.md --png bench/results/report.png

Kernel tables: per op and shape, each implementation's fastest time, GB/s, its share of the
memory-copy bandwidth measured in the same run (the best copy of the run, and the copy of the
same shape where one was measured), and its speed-up over
the ``xp`` reference and over PyTorch (``> 1`` means faster). Training tables: per config and
scope (step, epoch, full run), time and the ratios to PyTorch, to the GEMM floor and to the
``xp`` path (``< 1`` means faster than the other), plus test accuracy for full runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def load(paths):
    """Benchmarks of every file, and the machine info of the first."""
    benches, machine = [], None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or dict(data.get("machine_info", {}), datetime=data.get("datetime"))
        for b in data["benchmarks"]:
            b["_file"] = os.path.basename(path)
            benches.append(b)
    return benches, machine


def _time(seconds):
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def machine_lines(machine):
    versions = machine.get("versions", {})
    load = machine.get("loadavg_at_start")
    return [
        f"- CPU: {machine.get('cpu_model') or machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"{machine.get('cpu_count')} cores; numba threads {machine.get('numba_threads')}, "
        f"torch threads {machine.get('torch_threads')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- python {machine.get('python_version')}, {machine.get('system')} {machine.get('release')}; "
        f"run {machine.get('datetime')}; load average at start {load}",
    ]


def kernel_tables(benches):
    copies = [b for b in benches if b.get("extra_info", {}).get("op") == "copy"]
    limit = max((b["extra_info"].get("GB/s", 0) for b in copies), default=None)
    same_shape = defaultdict(float)  # the best copy of each shape: the limit at that size
    for b in copies:
        key = tuple(b["extra_info"]["shape"])
        same_shape[key] = max(same_shape[key], b["extra_info"].get("GB/s", 0))
    lines = []
    if copies:
        lines.append("### Memory copy (the limit every kernel is compared to)\n")
        lines.append("| shape | impl | time (min) | GB/s |")
        lines.append("| --- | --- | ---: | ---: |")
        for b in sorted(copies, key=lambda b: (b["extra_info"]["shape"], b["extra_info"]["impl"])):
            info = b["extra_info"]
            lines.append(f"| {tuple(info['shape'])} | {info['impl']} | {_time(b['stats']['min'])} | {info['GB/s']:.1f} |")
        lines.append(f"\nCopy limit used below: **{limit:.1f} GB/s** (the best copy of the run).\n")
    groups = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("op") in (None, "copy") or "shape" not in info:
            continue
        groups[(info["op"], tuple(info["shape"]))][info["impl"]] = b
    ops = sorted({op for op, _ in groups}, key=["softmax", "softmax_xent", "relu_backward", "bias_relu"].index)
    for op in ops:
        lines.append(f"### {op}\n")
        lines.append("| shape | impl | time (min) | GB/s | % of best copy | % of copy, same shape | vs xp | vs torch |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for shape in sorted(s for o, s in groups if o == op):
            row = groups[(op, shape)]
            for impl in ("xp", "numba", "numba-serial", "numba-parallel", "cuda", "torch",
                         "xp fresh", "numba fresh", "torch fresh"):
                if impl not in row:
                    continue
                # a fresh result is compared with the others' fresh results, an out= call with out= calls
                suffix = " fresh" if impl.endswith(" fresh") else ""
                t_xp = row.get("xp" + suffix, {}).get("stats", {}).get("min")
                t_torch = row.get("torch" + suffix, {}).get("stats", {}).get("min")
                t = row[impl]["stats"]["min"]
                gbs = row[impl]["extra_info"].get("GB/s", 0)
                share = f"{100 * gbs / limit:.0f}%" if limit else "-"
                local = f"{100 * gbs / same_shape[shape]:.0f}%" if same_shape.get(shape) else "-"
                lines.append(
                    f"| {shape} | {impl} | {_time(t)} | {gbs:.2f} | {share} | {local} | {_ratio(t_xp, t)} | {_ratio(t_torch, t)} |"
                )
        lines.append("")
    return lines


def training_tables(benches):
    groups = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        if "scope" in info:
            groups[(info["config"], info["scope"])][info["impl"]] = b
    lines = []
    for config in sorted({c for c, _ in groups}, key=lambda c: (len(c), c)):
        lines.append(f"### {config}, batch 128, SGD lr 0.1, float32\n")
        lines.append("| scope | impl | time (min) | vs torch | vs GEMM floor | vs xp | test accuracy |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for scope in ("step", "epoch", "run"):
            row = groups.get((config, scope))
            if not row:
                continue
            ref = {k: row.get(k, {}).get("stats", {}).get("min") for k in ("torch", "gemm-floor", "xpnet-xp")}
            for impl in ("xpnet", "xpnet-float32", "xpnet-xp", "torch", "jax-scan", "gemm-floor", "gemm-floor+gather"):
                if impl not in row:
                    continue
                info, t = row[impl]["extra_info"], row[impl]["stats"]["min"]
                label = f"{info.get('epochs')} epochs" if scope == "run" else scope
                acc = info.get("test_accuracy")
                lines.append(
                    f"| {label} | {impl} | {_time(t)} | {_ratio(t, ref['torch'])} | {_ratio(t, ref['gemm-floor'])} "
                    f"| {_ratio(t, ref['xpnet-xp'])} | {f'{acc:.4f}' if acc is not None else '-'} |"
                )
        lines.append("")
    return lines


def plot(benches, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernel = [b for b in benches if b.get("extra_info", {}).get("op") not in (None, "copy") and "shape" in b["extra_info"]]
    training = [b for b in benches if b.get("extra_info", {}).get("scope") == "run"]
    limit = max((b["extra_info"].get("GB/s", 0) for b in benches if b.get("extra_info", {}).get("op") == "copy"), default=0)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ops = ["softmax", "softmax_xent", "relu_backward", "bias_relu"]
    impls = ["xp", "numba", "torch"]
    big = sorted({tuple(b["extra_info"]["shape"]) for b in kernel}, key=lambda s: s[0] * s[1])[-1:] if kernel else []
    width = 0.25
    for k, impl in enumerate(impls):
        values = []
        for op in ops:
            match = [b for b in kernel if b["extra_info"]["op"] == op and b["extra_info"]["impl"] == impl
                     and tuple(b["extra_info"]["shape"]) in big]
            values.append(match[0]["extra_info"].get("GB/s", 0) if match else 0)
        axes[0].bar([i + (k - 1) * width for i in range(len(ops))], values, width, label=impl)
    if limit:
        axes[0].axhline(limit, color="k", linestyle="--", linewidth=1, label=f"memory copy {limit:.1f} GB/s")
    axes[0].set_xticks(range(len(ops)), ops)
    axes[0].set_ylabel("GB/s (higher is better)")
    axes[0].set_title(f"kernels at {big[0] if big else '?'} float32")
    axes[0].legend(fontsize=8)
    configs = sorted({b["extra_info"]["config"] for b in training}, key=len)
    names = ["xpnet", "xpnet-float32", "xpnet-xp", "torch", "gemm-floor"]
    bar = 0.8 / len(names)
    for k, impl in enumerate(names):
        values = []
        for config in configs:
            match = [b for b in training if b["extra_info"]["config"] == config and b["extra_info"]["impl"] == impl]
            values.append(match[0]["stats"]["min"] if match else 0)
        offset = (k - (len(names) - 1) / 2) * bar
        axes[1].bar([i + offset for i in range(len(configs))], values, bar, label=impl)
    axes[1].set_xticks(range(len(configs)), configs)
    axes[1].set_ylabel("seconds for the full run (lower is better)")
    axes[1].set_title("training on MNIST, batch 128, SGD")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--markdown", help="write the tables here (default: stdout)")
    parser.add_argument("--png", help="write the plot here")
    parser.add_argument("--strip-samples", action="store_true",
                        help="rewrite the JSON files without the per-round timings (stats.data), "
                             "which are 99%% of their size and unused here: the form kept in bench/results/")
    args = parser.parse_args(argv)
    if args.strip_samples:
        for path in args.json:
            with open(path) as f:
                report = json.load(f)
            for bench in report["benchmarks"]:
                bench["stats"].pop("data", None)
            with open(path + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(path + ".tmp", path)
    benches, machine = load(args.json)
    lines = ["## Machine\n", *machine_lines(machine), "", "## Kernels (float32)\n", *kernel_tables(benches)]
    training = training_tables(benches)
    if training:
        lines += ["## Training\n", *training]
    text = "\n".join(lines) + "\n"
    if args.markdown:
        tmp = args.markdown + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.markdown)
    else:
        sys.stdout.write(text)
    if args.png:
        plot(benches, args.png)


if __name__ == "__main__":
    main()
