#!/usr/bin/env bash
# Compile every CUDA module with FRUGAL_CUDA=ON for sm_90a and import the result (no GPU needed: the
# modules link only the static CUDA runtime). Usage: tools/cuda_compile_check.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cuda-check}
cmake -S . -B "$build" -G Ninja -DFRUGAL_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" ${FRUGAL_CUTLASS_DIR:+-DFRUGAL_CUTLASS_DIR=$FRUGAL_CUTLASS_DIR}
cmake --build "$build" -j "$(nproc)"
python - "$build" <<'PY'
import glob, importlib.util, sys
mods = sorted(glob.glob(f"{sys.argv[1]}/**/_C*.so", recursive=True))
assert mods, "no _C module was built"
for path in mods:
    pkg = path.split("/")[-2]  # load as <package>._C: a shared name would return the first module again
    spec = importlib.util.spec_from_file_location(f"{pkg}._C", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    names = sorted(n for n in dir(m) if not n.startswith("_"))
    print("imported", path, "->", names)
    # the entry points each Python wrapper calls (fp8/cuda_*_ops.py, moe_comm/cuda_ops.py)
    need = {"fp8": "sm90_fp8_gemm_nt_1x128_128x128_bf16", "moe_comm": "gather_rows"}.get(pkg)
    assert need is None or need in names, f"{path} lacks {need}"
PY
