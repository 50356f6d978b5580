#!/usr/bin/env bash
# One GPU round on a lent machine (see bench/README.md, GPU section): environment, the CUDA tests with
# skips turned into failures, the whole test suite, and the benchmark report. Logs go to $OUT.
# Usage: bash bench/cuda_round.sh [tests|suite|bench|peers ...]   (default: all four)
set -u
OUT=${OUT:-/tmp/xpnet_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XPNET_DATA=${XPNET_DATA:-$PWD/.data}
steps=${*:-tests suite bench peers}
{ nvidia-smi; nvcc --version; python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__); cupy.show_config()"; } > "$OUT/env.txt" 2>&1
for step in $steps; do
  case $step in
    tests) timeout ${T_TESTS:-200} python3 -m pytest tests/test_cuda.py --require-cuda -q -p no:cacheprovider -ra 2>&1 | tail -60 > "$OUT/test_cuda.log" ;;
    suite) timeout ${T_SUITE:-300} python3 -m pytest tests --require-cuda -q -p no:cacheprovider -ra 2>&1 | tail -80 > "$OUT/tests_all.log" ;;
    bench) timeout ${T_BENCH:-330} python3 bench/test_cuda_bench.py --out "$OUT/cuda-H100.json" > "$OUT/bench.log" 2>&1 ;;
    peers) timeout ${T_PEERS:-150} python3 bench/peers.py --seeds 3 --out "$OUT/cuda-peers.json" > "$OUT/peers.log" 2>&1 ;;
  esac
  echo "== $step done ($SECONDS s)"
done
