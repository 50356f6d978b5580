"""One device call for the wide-row softmax + cross-entropy kernel: variants checked and timed.

    git show 30bd0ac:kernels/xpnet_kernels.cu > cuda_ce_old_source.txt  # optional: the old kernel
    python3 bench/cuda_softmax_ce_check.py [--old cuda_ce_old_source.txt] [--no-tests]

Builds each variant of ``softmax_cross_entropy_block`` (the in-tree kernel, the same without or
with another ``__launch_bounds__``, and, if ``--old`` names a file, a previous xpnet_kernels.cu
with and without bounds) as its own small CuPy RawModule, checks each against a float64 NumPy
reference (wide rows in registers, streamed rows, float64, in place, a bad label), and times it
against a device-to-device copy in the same process (256 MB per operand, as bench_kernels):

- ``api``: ``cuda.softmax_cross_entropy`` with its launches routed to the variant, one call per
  pair of CUDA events (the number bench/README.md's kernel table reports: host time included);
- ``kernel``: ten raw launches between two events, divided by ten (the GPU's time alone).

Then runs the GPU tests of the softmax kernels (``--require-cuda``) on the in-tree source.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = int(os.environ.get("CE_CHECK_MB_BYTES", 1 << 20))  # smaller for a dry run
BOUNDS = "__launch_bounds__(256, 5) "
KERNEL = "__global__ void "


def variants(new_src: str, old_src: str | None) -> dict[str, str]:
    def bounds(src, spec):
        src = re.sub(r"__global__ void __launch_bounds__\(256, \d\)\s+softmax_cross_entropy_block\(",
                     "__global__ void softmax_cross_entropy_block(", src)
        return src.replace(KERNEL + "softmax_cross_entropy_block(", KERNEL + spec + "softmax_cross_entropy_block(")

    out = {}
    if old_src is not None:
        out["old"] = old_src
        out["old_lb5"] = bounds(old_src, BOUNDS)
    out["new"] = new_src
    out["new_nolb"] = bounds(new_src, "")
    out["new_lb5"] = bounds(new_src, BOUNDS)
    return out


NAMES = [
    "softmax_cross_entropy_block<float, long long, 4>",
    "softmax_cross_entropy_block<float, long long, 1>",
    "softmax_cross_entropy_block<double, long long, 2>",
    "softmax_cross_entropy_block<float, int, 4>",
    "softmax_cross_entropy_narrow<float, long long>",
    "softmax_cross_entropy_narrow<double, long long>",
    "softmax_block<float, 4>",
    "softmax_block<double, 2>",
]


def compile_variant(src):
    import cupy

    mod = cupy.RawModule(code=src, options=("-std=c++17",), name_expressions=NAMES)
    fns = {n: mod.get_function(n) for n in NAMES}
    return fns


def reference(z, y):
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    n = z.shape[0]
    valid = (y >= 0) & (y < z.shape[1])
    yy = np.where(valid, y, 0)
    loss_rows = (m[:, 0] + np.log(s[:, 0]) - z[np.arange(n), yy])
    loss_rows = np.where(valid, loss_rows, np.nan)
    g = p.copy()
    g[np.arange(n)[valid], yy[valid]] -= 1
    g[~valid] = np.nan
    correct = int(((z.argmax(axis=1) == y) & valid).sum())
    return g / n, loss_rows.sum() / n, correct


def check(fns, cuda) -> list[str]:
    """Problems of one variant's block kernel against the reference (empty: all right)."""
    import cupy

    problems = []
    rng = np.random.default_rng(1)
    cases = [("f32 4096 regs", np.float32, 67, 4096, 4), ("f32 4100 V=1", np.float32, 9, 4100, 1),
             ("f32 5000 streamed", np.float32, 13, 5000, 4), ("f64 4096 streamed", np.float64, 11, 4096, 2),
             ("f64 1030 regs", np.float64, 9, 1030, 2), ("f32 2048 regs", np.float32, 300, 2048, 4)]
    for label, dt, rows, cols, v in cases:
        for bad in (False, True):
            for inplace in (False, True):
                z = (rng.standard_normal((rows, cols)) * 3).astype(dt)
                z[::5, 7] = 50.0  # some rows with a clear argmax
                y = rng.integers(0, cols, rows).astype(np.int64)
                y[::5] = 7
                if bad:
                    y[rows // 2] = cols if rows % 2 else -1
                g_ref, l_ref, c_ref = reference(z, y)
                zd, yd = cupy.asarray(z), cupy.asarray(y)
                gd = zd if inplace else cupy.empty_like(zd)
                loss = cupy.zeros((), dt)
                corr = cupy.zeros((), np.uint64)
                t = "float" if dt == np.float32 else "double"
                name = f"softmax_cross_entropy_block<{t}, long long, {v}>"
                f = np.float32 if dt == np.float32 else np.float64
                fns[name]((cuda.blocks_for(rows, 1),), (cuda.THREADS,),
                          (zd, yd, gd, loss, np.int64(rows), np.int64(cols), f(1.0 / rows), f(1.0 / rows), corr))
                g, l, c = gd.get(), float(loss.get()), int(corr.get())
                tol = 1e-5 if dt == np.float32 else 1e-12
                tag = f"{label} bad={bad} inplace={inplace}"
                if bad:
                    badrow = rows // 2
                    ok_rows = np.arange(rows) != badrow
                    if not np.isnan(l):
                        problems.append(f"{tag}: loss {l} not NaN")
                    if not np.isnan(g[badrow]).all():
                        problems.append(f"{tag}: bad row's grad not NaN")
                    err = np.abs(g[ok_rows] - g_ref[ok_rows]).max()
                else:
                    err = np.abs(g - g_ref).max()
                    if abs(l - l_ref) > tol * 10 * max(1, abs(l_ref)):
                        problems.append(f"{tag}: loss {l} vs {l_ref}")
                if err > tol * (1.0 / rows) * 10 + 1e-9:
                    problems.append(f"{tag}: grad max error {err:.3g}")
                if c != c_ref:
                    problems.append(f"{tag}: correct {c} vs {c_ref}")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default=str(ROOT / "cuda_ce_old_source.txt"))
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--budget", type=float, default=172, help="seconds for the whole script")
    args = ap.parse_args()
    t0 = time.time()

    import cupy

    from bench.test_cuda_bench import time_gpu
    from xpnet.kernels import cuda

    new_src = cuda.source_path().read_text()
    old_path = Path(args.old)
    old_src = old_path.read_text() if old_path.is_file() else None
    srcs = variants(new_src, old_src)
    print("device:", cupy.cuda.runtime.getDeviceProperties(0)["name"], flush=True)

    compiled = {}
    for name, src in srcs.items():
        t = time.time()
        try:
            compiled[name] = compile_variant(src)
        except Exception as exc:
            print(f"{name}: compile failed: {exc}"[:2000], flush=True)
            continue
        attrs = compiled[name]["softmax_cross_entropy_block<float, long long, 4>"].attributes
        print(f"{name}: compiled in {time.time() - t:.1f} s; CE block f32: {attrs.get('num_regs')} regs, "
              f"{attrs.get('local_size_bytes')} B local", flush=True)

    for name, fns in compiled.items():
        problems = check(fns, cuda)
        print(f"{name}: check {'ok' if not problems else 'FAILED'}", *problems[:8], sep="\n  ", flush=True)

    stream = cupy.cuda.get_current_stream()
    results = []
    real_function = cuda._function
    for dtype in ("float32", "float64"):
        item = np.dtype(dtype).itemsize
        n = 256 * MB // item
        rng = cupy.random.default_rng(0)
        src_a, dst_a = rng.standard_normal(n, dtype=np.float32).astype(dtype), cupy.empty(n, dtype)
        xw = rng.standard_normal((n // 4096, 4096), dtype=np.float32).astype(dtype)
        ow = cupy.empty_like(xw)
        yw = rng.integers(0, 4096, xw.shape[0], dtype=np.int64)
        xn = rng.standard_normal((n // 10, 10), dtype=np.float32).astype(dtype)
        on = cupy.empty_like(xn)
        yn = rng.integers(0, 10, xn.shape[0], dtype=np.int64)
        wide_bytes = 2 * xw.nbytes + yw.nbytes
        narrow_bytes = 2 * xn.nbytes + yn.nbytes

        def copy():
            cupy.cuda.runtime.memcpyAsync(dst_a.data.ptr, src_a.data.ptr, src_a.nbytes,
                                          cupy.cuda.runtime.memcpyDeviceToDevice, stream.ptr)

        def ten(fn):
            def run():
                for _ in range(10):
                    fn()
            return run

        copy_s = time_gpu(copy)
        copy10_s = time_gpu(ten(copy)) / 10
        copy_bw, copy10_bw = 2 * src_a.nbytes / copy_s, 2 * src_a.nbytes / copy10_s
        print(f"\n{dtype}: copy {copy_s * 1e3:.3f} ms ({copy_bw / 1e9:.0f} GB/s), x10 {copy10_s * 1e3:.3f} ms",
              flush=True)
        f = np.float32 if dtype == "float32" else np.float64
        t = "float" if dtype == "float32" else "double"
        v = 16 // item
        loss = cupy.zeros((), dtype)
        for name, fns in compiled.items():
            cuda._function = lambda k, fns=fns: fns[k]
            try:
                api_w = time_gpu(lambda: cuda.softmax_cross_entropy(xw, yw, grad_out=ow))
                api_n = time_gpu(lambda: cuda.softmax_cross_entropy(xn, yn, grad_out=on))
                api_s = time_gpu(lambda: cuda.softmax(xw, out=ow))
            finally:
                cuda._function = real_function
            k = fns[f"softmax_cross_entropy_block<{t}, long long, {v}>"]
            grid = cuda.blocks_for(xw.shape[0], 1)
            kargs = (xw, yw, ow, loss, np.int64(xw.shape[0]), np.int64(4096), f(1 / xw.shape[0]),
                     f(1 / xw.shape[0]), np.uint64(0))
            raw = time_gpu(ten(lambda: k((grid,), (cuda.THREADS,), kargs))) / 10
            ks = fns[f"softmax_block<{t}, {v}>"]
            raw_s = time_gpu(ten(lambda: ks((grid,), (cuda.THREADS,),
                                             (xw, ow, np.int64(xw.shape[0]), np.int64(4096))))) / 10
            row = dict(variant=name, dtype=dtype,
                       ce4096_api=wide_bytes / api_w / copy_bw, ce4096_kernel=wide_bytes / raw / copy10_bw,
                       ce10_api=narrow_bytes / api_n / copy_bw,
                       sm4096_api=2 * xw.nbytes / api_s / copy_bw, sm4096_kernel=2 * xw.nbytes / raw_s / copy10_bw,
                       ce4096_api_ms=api_w * 1e3, ce4096_kernel_ms=raw * 1e3)
            results.append(row)
            print(f"  {name:9s} CE4096 api {row['ce4096_api']:6.1%} ({api_w * 1e3:.3f} ms) kernel "
                  f"{row['ce4096_kernel']:6.1%} ({raw * 1e3:.3f} ms) | CE10 api {row['ce10_api']:6.1%} | "
                  f"softmax4096 api {row['sm4096_api']:6.1%} kernel {row['sm4096_kernel']:6.1%}", flush=True)
        # host overhead: the API on one row (the kernel itself takes a few microseconds)
        x1, o1, y1 = xw[:1], ow[:1], yw[:1]
        h_ce = time_gpu(lambda: cuda.softmax_cross_entropy(x1, y1, grad_out=o1), repeat=50)
        h_sm = time_gpu(lambda: cuda.softmax(x1, out=o1), repeat=50)
        print(f"  one row through the API (host + launch): CE {h_ce * 1e6:.1f} us, softmax {h_sm * 1e6:.1f} us",
              flush=True)
        del src_a, dst_a, xw, ow, yw, xn, on, yn
        cupy.get_default_memory_pool().free_all_blocks()

    print(f"\nbench done in {time.time() - t0:.0f} s", flush=True)
    print("\nSUMMARY (% of D2D copy; api = one call per event pair as bench/README.md, kernel = 10 raw launches)")
    for r in results:
        print(f"{r['variant']:9s} {r['dtype']:8s} CE4096 api {r['ce4096_api']:6.1%} kernel {r['ce4096_kernel']:6.1%}"
              f"  CE10 api {r['ce10_api']:6.1%}  softmax4096 api {r['sm4096_api']:6.1%} kernel {r['sm4096_kernel']:6.1%}")
    sys.stdout.flush()

    if not args.no_tests:
        cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "tests/test_kernels.py", "-q",
               "--require-cuda", "-p", "no:cacheprovider", "-k", "(softmax or cross or xent) and not numba"]
        print("\n$", " ".join(cmd), flush=True)
        left = max(30.0, args.budget - (time.time() - t0))
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
            lines = (r.stdout + r.stderr).strip().splitlines()
            print("\n".join([ln for ln in lines if "FAILED" in ln or "Error" in ln][:20] + lines[-3:]))
            print("pytest rc", r.returncode)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            print(f"pytest TIMED OUT after {left:.0f} s;", out[-1500:])
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
