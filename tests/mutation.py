"""Mutation testing of xpnet's core modules with mutmut, one module at a time.

    pip install -e '.[mutation]'
    nice -n 15 python tests/mutation.py callbacks io     # or: all; --jobs N (default 2)

For each module, mutmut copies the package into ``mutants/``, mutates that module only and runs
the module's own test files (below) against every mutant, each mutant against just the tests
that call the mutated function. The script then prints the module's score. ``mutmut results``
and ``mutmut show NAME`` list and show the survivors of the last module run. Each run starts
from a fresh ``mutants/``: mutmut keeps a survivor's verdict even after new tests are added.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> (file mutated, the tests that must kill its mutants)
MODULES = {
    "callbacks": ("xpnet/callbacks.py", ["tests/test_callbacks.py"]),
    "io": ("xpnet/io.py", ["tests/test_io.py"]),
    "functional": (
        "xpnet/functional.py", ["tests/test_functional.py", "tests/test_gradcheck.py", "tests/test_conv_kernels.py"]
    ),
    "layers": ("xpnet/layers.py", ["tests/test_layers.py", "tests/test_init.py"]),
    # save/load and summary live in model.py; their tests sit with the file format and the layers
    "model": ("xpnet/model.py", ["tests/test_model.py", "tests/test_inputs.py", "tests/test_io.py",
                                 "tests/test_layers.py"]),
    "optim": ("xpnet/optim.py", ["tests/test_optim.py", "tests/test_cpu_step.py", "tests/test_sparse_layer.py"]),
    "training": ("xpnet/training.py", ["tests/test_training.py", "tests/test_images_on_cores.py",
                                       "tests/test_sample_weight.py", "tests/test_inputs.py",
                                       "tests/test_sparse_layer.py", "tests/test_sparse_input.py"]),
    "runs": ("xpnet/runs.py", ["tests/test_runs.py"]),
    "numba_cpu": (
        "xpnet/kernels/numba_cpu.py",
        ["tests/test_kernels.py", "tests/test_numba_parallel.py", "tests/test_conv_kernels.py",
         "tests/test_images_on_cores.py"],
    ),
    "cores": ("xpnet/kernels/cores.py", ["tests/test_images_on_cores.py", "tests/test_sparse_layer.py"]),
    "cpu_step": ("xpnet/kernels/cpu_step.py", ["tests/test_cpu_step.py", "tests/test_sparse_layer.py",
                                               "tests/test_sample_weight.py", "tests/test_inputs.py",
                                               "tests/test_sparse_input.py"]),
    "sparse": ("xpnet/sparse.py", ["tests/test_sparse_input.py", "tests/test_sparse_layer.py"]),
    # ranks played by threads in test_training; the mpiexec jobs of test_distributed run the
    # installed package, not the mutant, so only its in-process tests count
    "distributed": ("xpnet/distributed.py", ["tests/test_distributed.py", "tests/test_training.py"]),
}

# mutmut's exit codes -> how a mutant ended (mutmut.stats.status_by_exit_code, simplified)
STATUS = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests", 34: "skipped"}
TIMEOUT = {-24, 24, 152, 255, 36}


def mutate(module: str, jobs: int) -> None:
    """Run mutmut on one module (in a child process: mutmut keeps global state)."""
    from mutmut import configuration

    path, tests = MODULES[module]
    config = configuration.config()
    config.only_mutate = [path]
    config.pytest_add_cli_args_test_selection = tests
    from mutmut.__main__ import cli

    cli(["run", "--max-children", str(jobs)])


def outcomes(module: str) -> dict[str, str]:
    """Each mutant of ``module`` -> killed / survived / timeout / no tests / ..."""
    meta = ROOT / "mutants" / (MODULES[module][0] + ".meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {
        name: "timeout" if code in TIMEOUT else STATUS.get(code, "not checked" if code is None else "suspicious")
        for name, code in codes.items()
    }


def report(module: str) -> None:
    result = outcomes(module)
    counts = Counter(result.values())
    # a mutant that hangs the tests is caught: the test run fails on its time limit
    caught = counts["killed"] + counts["timeout"]
    score = 100 * caught / max(len(result), 1)
    print(f"{module}: {len(result)} mutants, {caught} killed ({score:.1f}%): {dict(counts)}")
    for name, status in sorted(result.items()):
        if status not in ("killed", "timeout"):
            print(f"  {status}: {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="+", choices=[*MODULES, "all"])
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--report", action="store_true", help="print the last run's score only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    modules = list(MODULES) if "all" in args.modules else args.modules
    if args.child:
        mutate(modules[0], args.jobs)
        return 0
    for module in modules:
        if not args.report:
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
            command = [sys.executable, __file__, module, "--child", "--jobs", str(args.jobs)]
            if subprocess.run(command, cwd=ROOT).returncode != 0:
                print(f"{module}: mutmut failed", file=sys.stderr)
                return 1
        report(module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
