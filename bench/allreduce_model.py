"""On paper: what the gradient all-reduce of data-parallel training costs on a cluster, and when
the network stops hiding behind the step (docs/distributed.md's tables come from this script).

The model: a ring all-reduce of S bytes over p nodes sends and receives 2 (p - 1) / p * S bytes
per node, in 2 (p - 1) hops of latency alpha each:

    t_allreduce = 2 (p - 1) / p * S / bandwidth + 2 (p - 1) * alpha

xpnet's all-reduce runs between the backward pass and the update, not overlapped with them, so
a step of compute time t_step runs at efficiency t_step / (t_step + t_allreduce): 90% needs
t_step >= 9 t_allreduce. The compute per step is per-row time x rows per node; the per-row
times are measured ones (bench/README.md), passed on the command line.

    python bench/allreduce_model.py --row-us 784-50-25-10=2.1 --row-us 784-256-128-10=8.9
"""

from __future__ import annotations

import argparse

NETWORKS = {"784-50-25-10": 40_785, "784-256-128-10": 235_146, "LeNet-5": 60_074}  # parameters
LINKS_GBIT = (10, 25, 100)
NODES = (2, 4, 8, 16, 32, 64)


def allreduce_seconds(nbytes: float, nodes: int, gbit: float, alpha: float) -> float:
    if nodes == 1:
        return 0.0
    return 2 * (nodes - 1) / nodes * nbytes / (gbit * 1e9 / 8) + 2 * (nodes - 1) * alpha


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alpha-us", type=float, default=10.0, help="latency per hop (default 10 us)")
    parser.add_argument("--bytes-per-param", type=int, default=4, help="4 for float32 gradients")
    parser.add_argument("--row-us", action="append", default=[], help="NET=us: compute per training row on one node")
    args = parser.parse_args(argv)
    alpha = args.alpha_us * 1e-6
    row_us = dict(item.split("=") for item in args.row_us)

    print(f"All-reduce per step (ring, latency {args.alpha_us:g} us per hop), and the shortest step that "
          "keeps 90% efficiency (9x the all-reduce):\n")
    print("| network | gradient bytes | link | " + " | ".join(f"{p} nodes" for p in NODES) + " |")
    print("| --- | ---: | --- | " + " | ".join("---:" for _ in NODES) + " |")
    for name, params in NETWORKS.items():
        nbytes = params * args.bytes_per_param
        for gbit in LINKS_GBIT:
            cells = []
            for p in NODES:
                t = allreduce_seconds(nbytes, p, gbit, alpha)
                cells.append(f"{t * 1e6:.0f} us / {9 * t * 1e3:.2f} ms")
            print(f"| {name} | {nbytes / 1e3:.0f} KB | {gbit} Gb/s | " + " | ".join(cells) + " |")
    if row_us:
        print("\nGlobal batch for 90% efficiency at 16 nodes (compute per node = rows per node x time per row):\n")
        print("| network | time per row | " + " | ".join(f"{g} Gb/s" for g in LINKS_GBIT) + " |")
        print("| --- | ---: | " + " | ".join("---:" for _ in LINKS_GBIT) + " |")
        for name, us in row_us.items():
            nbytes = NETWORKS[name] * args.bytes_per_param
            cells = []
            for gbit in LINKS_GBIT:
                rows_per_node = 9 * allreduce_seconds(nbytes, 16, gbit, alpha) / (float(us) * 1e-6)
                cells.append(f"{16 * rows_per_node:,.0f}")
            print(f"| {name} | {float(us):g} us | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
