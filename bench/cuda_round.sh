#!/usr/bin/env bash
# One GPU round on a lent machine (see bench/README.md, GPU section): environment, the CUDA tests with
# skips turned into failures (tests/test_cuda.py alone, or every test whose id names cuda, spread over
# 8 processes), the whole test suite, the benchmark report, the compiled peers, LeNet-5 and where
# its step goes. Logs go to $OUT.
# Usage: bash bench/cuda_round.sh [tests|cuda|suite|bench|peers|lenet|lenetprof ...]   (default: tests suite bench peers)
set -u
OUT=${OUT:-/tmp/xpnet_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XPNET_DATA=${XPNET_DATA:-$PWD/.data}
steps=${*:-tests suite bench peers}
{ nvidia-smi; nvcc --version; python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__); cupy.show_config()"; } > "$OUT/env.txt" 2>&1
for step in $steps; do
  case $step in
    tests) timeout ${T_TESTS:-200} python3 -m pytest tests/test_cuda.py --require-cuda -q -p no:cacheprovider -ra 2>&1 | tail -60 > "$OUT/test_cuda.log" ;;
    cuda) timeout ${T_CUDA:-240} python3 -m pytest tests -k cuda --require-cuda --no-cov -n 8 --timeout 150 -q -p no:cacheprovider -ra --durations=15 > "$OUT/tests_cuda.log" 2>&1 ;;
    suite) timeout ${T_SUITE:-300} python3 -m pytest tests --require-cuda -q -p no:cacheprovider -ra 2>&1 | tail -80 > "$OUT/tests_all.log" ;;
    bench) timeout ${T_BENCH:-330} python3 bench/test_cuda_bench.py --out "$OUT/cuda-H100.json" > "$OUT/bench.log" 2>&1 ;;
    peers) timeout ${T_PEERS:-150} python3 bench/peers.py --seeds 3 ${PEERS_ARGS:-} --out "$OUT/cuda-peers.json" > "$OUT/peers.log" 2>&1 ;;
    lenet) timeout ${T_LENET:-170} python3 bench/cuda_lenet.py --out "$OUT/cuda-lenet.json" > "$OUT/lenet.log" 2>&1 ;;
    lenetprof) timeout ${T_LENETPROF:-120} python3 bench/cuda_lenet.py --profile --out "$OUT/cuda-lenet-profile.json" > "$OUT/lenet-profile.log" 2>&1 ;;
  esac
  echo "== $step done ($SECONDS s)"
done
