#!/usr/bin/env bash
# Device check for the ONNX scorer on a machine with an NVIDIA GPU. Unattended, < 5 minutes.
#
#   bash bench/gpu_check.sh            # results in $OUT if set, else bench/out/gpu-<time>/
#
# Steps (each bounded by a timeout, all inside one 290 s budget):
#   1. machine: nvidia-smi must see a GPU;
#   2. python: .venv (made with --system-site-packages if absent) with the project and
#      onnxruntime-gpu; installs what is missing at the versions of locks/dev.txt — from PyPI, or
#      offline from wheels in $SEQR_WHEELS (pip --no-index --find-links);
#   3. probe: a one-node session on the CUDA provider must really run on CUDA (if not, tries
#      onnxruntime-gpu's [cuda,cudnn] extras once, then fails with the reason);
#   4. tests: `pytest -m gpu`, then the parity suites with SEQR_ONNX_PROVIDER=cuda (every ORT
#      session of tests/core/test_onnx_export.py and tests/server/test_onnx_backend.py on CUDA);
#   5. bench: bench/onnx_bench.py with the CUDA provider (numpy stays on the CPU).
# Writes gpu_check.log, pytest_*.log, bench_cuda.md and summary.txt; exits non-zero on failure.
set -euo pipefail

cd "$(dirname "$0")/.."
BUDGET=${SEQR_GPU_CHECK_BUDGET:-290}
RESULTS=${OUT:-bench/out/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HYPOTHESIS_PROFILE=dev
declare -a SUMMARY=()
FAILED=0

step() { printf '\n=== [%3ss] %s\n' "$SECONDS" "$*"; }
left() { local l=$((BUDGET - SECONDS)); ((l > 5)) && echo "$l" || echo 5; }
cap() { local want=$1 l; l=$(left); ((want < l)) && echo "$want" || echo "$l"; }
record() { SUMMARY+=("$1: $2"); [[ $2 == PASS* || $2 == SKIP* ]] || FAILED=1; }
finish() {
  { printf 'seqr-router gpu_check %s\n' "$(date -Is)"; printf '%s\n' "${SUMMARY[@]}"; } > "$RESULTS/summary.txt"
  step "summary (results in $RESULTS)"
  cat "$RESULTS/summary.txt"
  exit "$FAILED"
}
trap 'record "script" "FAIL (line $LINENO)"; finish' ERR

step "machine"
if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; then
  record machine "FAIL: nvidia-smi sees no NVIDIA GPU"; finish
fi
record machine PASS

step "python environment"
PY=${PYTHON:-.venv/bin/python}
if [[ ! -x $PY ]]; then
  python3 -m venv --system-site-packages .venv
  PY=.venv/bin/python
fi
PIP=("$PY" -m pip install -q --disable-pip-version-check)
[[ -n ${SEQR_WHEELS:-} ]] && PIP+=(--no-index --find-links "$SEQR_WHEELS")
missing=$("$PY" - <<'PYMODS'
import importlib.util
want = {"numpy": "numpy", "onnx": "onnx", "onnxruntime": "onnxruntime-gpu", "hypothesis": "hypothesis",
        "pytest": "pytest", "ml_dtypes": "ml_dtypes", "safetensors": "safetensors"}
print(" ".join(p for m, p in want.items() if importlib.util.find_spec(m) is None))
PYMODS
)
if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  missing="$missing onnxruntime-gpu"     # plain (CPU) onnxruntime, or none: the GPU build is needed
fi
if [[ -n ${missing// /} ]]; then
  echo "installing:$missing (pinned by locks/dev.txt where listed)"
  pins=()
  for p in $missing; do pins+=("$(grep -oE "^${p}==[^ ]+" locks/dev.txt || echo "$p")"); done
  timeout "$(cap 120)" "${PIP[@]}" "${pins[@]}" || { record python "FAIL: could not install${missing}"; finish; }
fi
if ! "$PY" -c "import seqr_core, seqr_server" 2>/dev/null; then
  timeout "$(cap 60)" "${PIP[@]}" --no-deps --no-build-isolation -e . || { record python "FAIL: pip install -e ."; finish; }
fi
"$PY" -c "import sys, numpy, onnx, onnxruntime as o; print(sys.version.split()[0], 'numpy', numpy.__version__, 'onnx', onnx.__version__, 'onnxruntime', o.__version__, o.get_available_providers())"
record python PASS

step "CUDA provider probe"
cat > "$RESULTS/probe.py" <<'PROBE'
import numpy as np, onnxruntime as ort
from onnx import helper as h, TensorProto as T
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
ops = [h.make_opsetid("", 18)]
g = h.make_graph([h.make_node("MatMul", ["x", "x"], ["y"])], "probe",
                 [h.make_tensor_value_info("x", T.FLOAT, [64, 64])], [h.make_tensor_value_info("y", T.FLOAT, [64, 64])])
m = h.make_model(g, opset_imports=ops, ir_version=h.find_min_ir_version_for(ops))
s = ort.InferenceSession(m.SerializeToString(), providers=[("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"])
x = np.random.rand(64, 64).astype(np.float32)
assert np.allclose(s.run(None, {"x": x})[0], x @ x, rtol=1e-5), "wrong result on CUDA"
print("active providers:", s.get_providers())
raise SystemExit(0 if s.get_providers()[0] == "CUDAExecutionProvider" else 1)
PROBE
if ! timeout "$(cap 60)" "$PY" "$RESULTS/probe.py"; then
  echo "CUDA provider not active: trying onnxruntime-gpu's CUDA/cuDNN wheels once"
  ver=$("$PY" -c "import onnxruntime as o; print(o.__version__)")
  timeout "$(cap 120)" "${PIP[@]}" "onnxruntime-gpu[cuda,cudnn]==$ver" || true
  if ! timeout "$(cap 60)" "$PY" "$RESULTS/probe.py"; then
    record cuda_probe "FAIL: onnxruntime's CUDA provider does not load (CUDA/cuDNN libraries for onnxruntime-gpu $ver missing?)"
    finish
  fi
fi
record cuda_probe PASS

step "pytest -m gpu"
set +e
SEQR_ONNX_PROVIDER=cuda timeout "$(cap 90)" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/server/test_onnx_backend.py \
  2>&1 | tee "$RESULTS/pytest_gpu.log" | grep -v "W:onnxruntime"
rc=${PIPESTATUS[0]}
set -e
if ((rc == 0)); then record pytest_gpu PASS; else record pytest_gpu "FAIL (exit $rc, see pytest_gpu.log)"; fi

step "parity suites on the CUDA provider (SEQR_ONNX_PROVIDER=cuda)"
set +e
SEQR_ONNX_PROVIDER=cuda timeout "$(cap 120)" "$PY" -m pytest -q -p no:cacheprovider \
  tests/core/test_onnx_export.py tests/server/test_onnx_backend.py 2>&1 | tee "$RESULTS/pytest_cuda_parity.log" | grep -v "W:onnxruntime"
rc=${PIPESTATUS[0]}
set -e
if ((rc == 0)); then record parity_cuda PASS; else record parity_cuda "FAIL (exit $rc, see pytest_cuda_parity.log)"; fi

step "throughput: numpy (CPU) vs onnx (CUDA)"
set +e
SEQR_ONNX_PROVIDER=cuda timeout "$(cap 150)" "$PY" bench/onnx_bench.py --budget 0.3 --out "$RESULTS/bench_cuda.md" 2>&1 \
  | grep -v "W:onnxruntime"
rc=${PIPESTATUS[0]}
set -e
if ((rc == 0)); then record bench "PASS (bench_cuda.md)"; else record bench "FAIL (exit $rc; 124 = out of time)"; fi

trap - ERR
finish
