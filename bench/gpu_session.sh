#!/usr/bin/env bash
# One device session's GPU checks, in order of importance (run from the repository root on a CUDA
# machine; results under bench/results/ and, when $OUT is set, there too):
#   1. the kernel speed table (bench/kernels_gpu.py),
#   2. the Triton kernel tests compiled for the GPU (not the interpreter),
#   3. the tiny-model end-to-end tests with the models on the GPU,
#   4. batch-1 decoding (bench/decode_gpu.py),
#   5. Nsight Compute on the tuned batch-1 kernel (bench/ncu_gemvg.py), when ncu is there.
# SKIP_E2E=1 / SKIP_DECODE=1 / SKIP_NCU=1 leave steps out. The device returns at most 8 files:
# the tables come back as they are, everything else in $OUT/gpu_logs.tgz.
# The working tree travels without .git: pass the commit it is, for the results' provenance:
#   QBAYES_COMMIT=$(git rev-parse HEAD) ... (typed here, expanded on this side) bash bench/gpu_session.sh
set -u
if [ -z "${QBAYES_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "warning: no git here and QBAYES_COMMIT unset: results will record commit 'unknown'" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT="${OUT:-/tmp/qbayes-gpu}"; mkdir -p "$OUT"
L=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>&1 | tee "$L/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$L/gpu.txt"
timeout "${BENCH_TIMEOUT:-300}" python3 bench/kernels_gpu.py "$@" 2>&1 | tee "$L/bench.log"
cp bench/results/kernels_gpu.json bench/results/kernels_gpu.md bench/results/kernels.json "$OUT/" 2>/dev/null
QBAYES_TRITON_TUNE=0 timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py 2>&1 | tail -15 | tee "$L/tests_triton.log"
[ -n "${SKIP_E2E:-}" ] || QBAYES_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_end_to_end.py 2>&1 | tail -15 | tee "$L/tests_e2e.log"
# 4. batch-1 decoding of a random-weight Llama-3.2-1B-shaped model: HF loop vs qbayes loop, bf16 vs W4
[ -n "${SKIP_DECODE:-}" ] || { timeout "${DECODE_TIMEOUT:-150}" python3 bench/decode_gpu.py --shape 1b 2>&1 | tail -12 | tee "$L/decode_gpu.log"; cp bench/results/decode_gpu.json bench/results/decode_gpu.md "$OUT/" 2>/dev/null; }
# 5. hardware counters of the tuned batch-1 kernel (4096x14336, 4-bit): DRAM throughput, issue use, stalls
if [ -z "${SKIP_NCU:-}" ] && command -v ncu >/dev/null; then
  timeout 90 python3 bench/ncu_gemvg.py --tune 2>&1 | tee "$L/ncu_tune.log"
  cfg=$(tail -1 "$L/ncu_tune.log")
  timeout "${NCU_TIMEOUT:-120}" ncu --clock-control none -k regex:gemv --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    --section LaunchStats python3 bench/ncu_gemvg.py --config "$cfg" > "$L/ncu_gemvg.txt" 2>&1
  tail -60 "$L/ncu_gemvg.txt"
fi
tar czf "$OUT/gpu_logs.tgz" -C "$L" .
