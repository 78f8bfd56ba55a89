#!/usr/bin/env bash
# One prepared GPU check for `cmafnet bench` (issue 8, SPEC §9). Run ONCE from the repository root on
# a machine with one CUDA GPU; everything it produces goes to $OUT:
#   gpu_tests.log       pytest -m gpu
#   bench.json          eager run: models, whole-step CUDA graph, switches, data path on a generated
#                       IDC-sized store (GPU_CHECK_EAGER_ARGS replaces the default options)
#   bench_compile.json  torch.compile run of CMAF-Net and the naive reference (if time is left)
# GPU_CHECK_PHASES selects among "tests eager compile" (default: all three, in that order).
#   profile_*.txt       torch.profiler op tables of CMAF-Net and naive training steps
#   *.log, env.txt      full logs, nvidia-smi, versions
# It installs nothing from the internet. Missing Python packages are installed from wheels carried
# in the tree (`wheels/` or `.whl/`, e.g. run(carry=[".whl"]) for the ignored `.whl/` folder);
# the package itself is used from `src/` (an editable install is attempted but not required).
# The whole script ends within GPU_CHECK_BUDGET_S seconds (default 540, 9 minutes; the compile phase
# needs ~300 s of it, compiling CMAF-Net and its regularisers for training and for eval): each
# step runs under `timeout`, and the bench rewrites its JSON after every part, so a step stopped by
# its time limit still leaves the numbers it had.
set -u
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
left() { echo $((BUDGET - ($(date +%s) - START))); }
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
CMAFNET=("$PY" -c 'import sys; from cmafnet.cli import main; sys.exit(main())')
DEVICE=${GPU_CHECK_DEVICE:-cuda}  # cpu only to try the script's mechanics
read -r -a EXTRA <<< "${GPU_CHECK_EXTRA:-}"  # appended to each bench command (last flag wins)
# The benched model: the paper recipe in bf16 (the bench's autocast; paper.yaml itself is fp16, which
# train.cuda_graph refuses) with exact MobileViT attention, as in every number of docs/performance.md
# and as in the naive reference. GPU_CHECK_CONFIG="--config paper_bf16" benches the Nystrom model.
read -r -a CONFIG <<< "${GPU_CHECK_CONFIG:---config paper_bf16 --set model.contextual.attention=full}"

echo "== gpu_check $(date -u +%FT%TZ), budget ${BUDGET}s, OUT=$OUT"
{ nvidia-smi || true; "$PY" -V; "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|timm|kornia|pydantic|pyyaml|numpy|safetensors) " ; } \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" \
  || { echo "FATAL: torch/timm not importable"; exit 1; }

# ---- dependencies: what the bench imports (pydantic, yaml, kornia for the model's Sobel and the data path)
missing() {
  "$PY" - <<'EOF'
import importlib.util
need = {"pydantic": "pydantic", "yaml": "pyyaml", "numpy": "numpy", "kornia": "kornia", "safetensors": "safetensors"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
}
MISSING=$(missing)
if [ -n "$MISSING" ]; then
  echo "missing Python packages: $MISSING"
  for d in wheels .whl; do
    [ -d "$d" ] || continue
    echo "installing from $d/ (no index)"
    timeout 90 "$PY" -m pip install -q --no-index --find-links "$d" $MISSING \
      || timeout 60 "$PY" -m pip install -q --no-index --no-deps "$d"/*.whl || true
  done
  MISSING=$(missing)
  [ -n "$MISSING" ] && echo "WARNING: still missing: $MISSING (kornia missing = CMAF-Net and the data path are not measured)"
fi
# PYTHONPATH=src is enough; an editable install only when that import fails (it needs build tools)
if [ -z "${GPU_CHECK_NO_INSTALL:-}" ] && ! "$PY" -c "import cmafnet" 2>/dev/null; then
  timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "note: editable install failed; using PYTHONPATH=src"
fi
"$PY" -c "import cmafnet, cmafnet.cli.bench; print('cmafnet', cmafnet.__version__, 'from', cmafnet.__file__)" \
  || { echo "FATAL: cmafnet not importable"; exit 1; }

PHASES=${GPU_CHECK_PHASES:-tests eager compile}
has() { [[ " $PHASES " == *" $1 "* ]]; }

# ---- 0. the GPU tests (pytest -m gpu: CUDA graphs of the training step, mixed precision, compile, ...)
if has tests; then
  T=${GPU_CHECK_TESTS_S:-120}
  echo "== pytest -m gpu (timeout ${T}s, $(left)s left)"
  # the full log goes to $OUT (failure tracebacks included; torch's DEBUG log records are not captured)
  timeout -k 10 "$T" "$PY" -m pytest -q -m gpu -p no:cacheprovider -p no:logging -o addopts="" --tb=short \
    --continue-on-collection-errors tests > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -30
fi

# ---- 1. eager run: CMAF-Net eager and whole-step CUDA graph, the naive reference, switches, and a
#         fraction of an IDC-sized epoch (277,524 patches) through the real data path
if has eager; then
  T=$(( $(left) - ${GPU_CHECK_COMPILE_RESERVE_S:-300} ))
  [ "$T" -gt 300 ] && T=300
  [ "$T" -lt 60 ] && T=60
  read -r -a EAGER <<< "${GPU_CHECK_EAGER_ARGS:---models cmafnet naive --switch channels_last cuda_graph --latency-steps 50 --data-path --store-size 277524 --epoch-fraction 0.02}"
  echo "== eager bench (timeout ${T}s, $(left)s left)"
  timeout -k 10 "$T" "${CMAFNET[@]}" bench --device "$DEVICE" --size 224 "${CONFIG[@]}" \
    ${EAGER[@]+"${EAGER[@]}"} --profile "$OUT" --json "$OUT/bench.json" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$OUT/bench.log"
  echo "eager bench exit ${PIPESTATUS[0]} (124 = time limit; the JSON holds what was measured)"
fi

# ---- 2. compiled run: CMAF-Net compiled (and compiled + whole-step graph); the naive reference
#         eager, re-measured in the same process for the ratios
if has compile; then
  T=$(( $(left) - 15 ))
  if [ "$T" -ge 90 ]; then
    echo "== compile bench (timeout ${T}s)"
    timeout -k 10 "$T" "${CMAFNET[@]}" bench --device "$DEVICE" --size 224 "${CONFIG[@]}" \
      --models cmafnet naive --compile --runs naive cmafnet+compile+graph cmafnet+compile cmafnet+graph --no-switches \
      --json "$OUT/bench_compile.json" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$OUT/bench_compile.log"
    echo "compile bench exit ${PIPESTATUS[0]}"
  else
    echo "== compile bench skipped: only $(left)s left"
  fi
fi

# ---- summary
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for name in ("bench.json", "bench_compile.json"):
    p = Path(sys.argv[1]) / name
    if not p.exists():
        print(f"{name}: not written"); continue
    r = json.loads(p.read_text())
    print(f"{name}: complete={r.get('complete')} errors={r.get('errors')} device={r['environment']['device_name']}")
    for t in r.get("targets", []):
        print(f"  {str(t['passed']):5} {t['name']:<22} {t['value']!s:>24} {t['op']} {t['threshold']}")
EOF
echo "== done in $(( $(date +%s) - START ))s"
