#!/usr/bin/env bash
# One command for a CUDA machine: install the checkout into the Python that has CUDA torch,
# run every GPU test and every GPU benchmark, and write a summary — in under 8 minutes.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # default OUT_DIR: $OUT, else bench/gpu_out
#
# Each step runs under its own time limit (the limits add up to 8 minutes) and its log goes
# to OUT_DIR/<step>.log; OUT_DIR/summary.txt lists each step's status, seconds and last lines.
# Without a CUDA device it says so and exits 2 before running anything.
# Kernel issues add their GPU tests (mark them `@pytest.mark.gpu`, or put them under
# tests/kernels/, which runs on CUDA when it is there) and their benchmarks below.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/gpu_out}}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
PY="${PYTHON:-python}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False)" | tee "$SUMMARY"
    exit 2
fi

# The GPU machine cannot reach a package index: install the checkout only, against what its
# Python already has (torch with CUDA, triton); what is missing shows up in the test logs.
"$PY" -m pip install --no-deps --no-build-isolation -q -e . >"$OUT_DIR/install.log" 2>&1 \
    || echo "gpu_check: editable install failed (see install.log); running from the tree" >>"$OUT_DIR/install.log"

{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    "$PY" -c 'import torch, triton; p = torch.cuda.get_device_properties(0); print(f"device {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, triton {triton.__version__}")' 2>&1
    echo
} >"$SUMMARY"

FAILED=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT (${limit}s)"; FAILED=1
    elif [ $rc -ne 0 ]; then status="FAILED rc=$rc"; FAILED=1; fi
    {
        echo "== $name: $status in $((SECONDS - start))s"
        tail -n 25 "$OUT_DIR/$name.log"
        echo
    } >>"$SUMMARY"
}

# Tests: the kernels against their torch references on the GPU (the FP8 and W4A16 GEMMs
# included), CUDA graphs, the model parity suite through the Triton backend, and everything
# marked gpu.
step kernel_tests 100 "$PY" -m pytest -q tests/kernels -p no:cacheprovider
step gpu_marked_tests 70 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
step cuda_graph_tests 60 "$PY" -m pytest -q tests/worker/test_cuda_graphs.py -p no:cacheprovider
step parity_tests 60 "$PY" -m pytest -q tests/models/test_parity.py -p no:cacheprovider

# Benchmarks: ratios measured in the same run.
step kernel_bench 45 "$PY" bench/kernel_bench.py --quick
step moe_bench 25 "$PY" bench/moe.py --quick
step mxfp4_moe_bench 25 "$PY" bench/moe.py --quick --mxfp4  # MXFP4 vs bf16 experts
step grouped_moe_bench 20 "$PY" bench/moe.py --quick --grouped  # grouped GEMM; FP8 vs bf16
step quant_bench 45 "$PY" bench/quant.py --skip-cpu  # W8A16 and W4A16 vs fp16
step ssm_bench 15 "$PY" bench/ssm.py --quick --gpu-only
# The GDN and lightning kernels' tests run in kernel_tests (tests/kernels/).
step linear_attention_bench 15 "$PY" bench/linear_attention.py --quick --gpu-only  # gdn, lightning

echo "gpu_check: summary in $SUMMARY"
cat "$SUMMARY"
exit $FAILED
