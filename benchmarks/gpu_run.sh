#!/usr/bin/env bash
# The one command to run when a GPU is lent: bash benchmarks/gpu_run.sh
#
# For a GPU host without network (torch, onnx and onnxruntime present; no pymetis, no TensorRT):
# installs nmcompile without its dependencies, checks the 2:4 kernels in its first seconds, then
# runs each GPU benchmark under its own timeout, all within about 8 minutes. Results go to $OUT
# (default benchmarks/results/gpu): gpu_latency.json / .md, block_sparse_cuda.json / .md and a log
# per step. Every benchmark rewrites its JSON after each row and flushes on SIGTERM, so a step cut
# by its timeout keeps what it measured.
#
# DRY_RUN=1 checks this script on a CPU machine (tests/test_gpu_script.py does): no pip install
# (the PYTHONPATH package tree instead), no GPU check, gpu_latency.py --dry-run on $DRY_PARTS.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
T0=$(date +%s)
say() { echo "[gpu_run $(($(date +%s) - T0))s] $*"; }

DRY="${DRY_RUN:-0}"

# 1. nmcompile importable as installed (passes/ and runtime/ map into the package)
if [ "$DRY" = 1 ] || ! $PY -m pip install --no-deps --no-build-isolation -q -e . \
    >"$OUT/install.log" 2>&1; then
    # no setuptools / pip refused: a package tree in a temporary folder does the same
    say "pip install failed (see $OUT/install.log): using a PYTHONPATH package tree"
    SHIM="$(mktemp -d)"
    cp -r nmcompile "$SHIM/nmcompile"
    cp -r passes "$SHIM/nmcompile/passes"
    cp -r runtime "$SHIM/nmcompile/runtime"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. the first seconds: GPU, 2:4 kernels, nmcompile imports without pymetis
DRY="$DRY" $PY - <<'PY' 2>&1 | tee "$OUT/check.log"
import json, os, torch
ok = torch.cuda.is_available() or os.environ["DRY"] == "1"
info = {"torch": torch.__version__, "cuda": ok}
if torch.cuda.is_available():
    cs = torch.backends.cusparselt
    info |= {
        "gpu": torch.cuda.get_device_name(),
        "capability": torch.cuda.get_device_capability(),
        "cusparselt": cs.version() if cs.is_available() else None,
    }
import nmcompile  # noqa: E402  (fails here, not later, if the install did not work)
info["nmcompile"] = os.path.dirname(nmcompile.__file__)
print(json.dumps(info))
if not ok:
    raise SystemExit("no CUDA GPU visible to torch")
if torch.cuda.is_available() and info["cusparselt"] is None:
    print("WARNING: torch has no cuSPARSELt; 2:4 kernels only via CUTLASS on SM8x")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { say "check failed: see $OUT/check.log"; exit 1; }

step() {  # step NAME SECONDS COMMAND...: run under a timeout (SIGTERM, then SIGKILL 20 s later)
    local name=$1 limit=$2
    shift 2
    say "$name (limit ${limit}s): $*"
    timeout -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    say "$name: exit $rc"
}

# 3. the 2:4 latency tables (its preflight checks layout and one CUDA-graph capture first)
if [ "$DRY" = 1 ]; then
    step gpu_latency 300 $PY benchmarks/gpu_latency.py --dry-run --parts "${DRY_PARTS:-linear,bert,trt}" \
        --out "$OUT/gpu_latency.json"
    say "dry run done: results in $OUT"
    exit 0
fi
step gpu_latency 400 $PY benchmarks/gpu_latency.py --quick --budget-s 330 --out "$OUT/gpu_latency.json"

# 4. regrouped (block-sparse) layers vs dense on the GPU
step block_sparse 60 $PY benchmarks/block_sparse_speed.py --device cuda --budget-s 40 \
    --out "$OUT/block_sparse_cuda.json"

# 5. research GPU runs of the claims issues. They need Fashion-MNIST, which the host cannot
# download: carry the Debian files in the git-ignored data/fashion-mnist (run tool: carry
# ["data"]). The logs resume: the committed rows are copied in first, so each GPU session adds
# seeds and methods where the last one stopped.
if [ -d data/fashion-mnist ]; then
    export NMCOMPILE_FASHION_MNIST="$PWD/data/fashion-mnist"
    cp -n benchmarks/results/lth_resnet20_cuda.jsonl "$OUT/" 2>/dev/null || true
    step lth_resnet20_cuda "${LTH_GPU_S:-150}" $PY benchmarks/lth_fashion_mnist.py --device cuda \
        --model resnet20 --iterations 2000 --patterns 2:4 --seeds 0,1,2 \
        --methods dense-1r,dense,asp,mimp,mimp-rand,lmimp --out "$OUT/lth_resnet20_cuda.jsonl"
    # dynamic sparse training and learned N:M on resnet20, 10 epochs: IEE / RigL / static at
    # 90% and LBC / SR-STE at 1:16, one process per seed appending to one log
    cp -n benchmarks/results/dst_resnet20_cuda.jsonl "$OUT/" 2>/dev/null || true
    for seed in 0 1 2; do
        timeout -k 20 "${DST_GPU_S:-240}" $PY benchmarks/dst_converged.py --device cuda \
            --model resnet20 --iterations 4690 --no-prune-stem --settings "90% uniform" \
            --patterns 1:16 --seeds "$seed" --out "$OUT/dst_resnet20_cuda.jsonl" \
            >"$OUT/dst_resnet20_cuda_$seed.log" 2>&1 &
    done
    wait
    tail -n 5 "$OUT"/dst_resnet20_cuda_*.log
    say "dst_resnet20_cuda: done"
else
    say "no data/fashion-mnist in the checkout: the claims' GPU runs are skipped"
fi
say "done: results in $OUT"
ls -l "$OUT"
