#!/usr/bin/env bash
# The one prepared GPU check (one H100/H200, at most GPU_CHECK_BUDGET_S seconds, default 540 = 9 minutes,
# nothing from the internet). Run it ONCE from the repository root; everything goes to $OUT:
#   trainer_speed.json   `cmafnet train` itself on a generated IDC-like store (50 px patches trained at
#                        224 px): the paper config's stages, GPU_CHECK_STEPS steps x 2 epochs each, for the
#                        variants below, beside the naive reference's step (`cmafnet bench --models naive`)
#                        measured in the same run; per stage the trainer's img/s, the ratios to the naive
#                        reference, the targets, and the paper protocol per seed projected from the
#                        fastest variant of each stage (python -m cmafnet.bench.acceptance)
#   runs/<variant>/      the run folders (metrics.csv per epoch, run.json with stage_throughput)
#   gpu_tests.log        pytest -m gpu (the CUDA tests), after the speed runs
#   *.log, env.txt       full logs, nvidia-smi, versions
# Variants (GPU_CHECK_VARIANTS, in this order): graph (train.cuda_graph, eager model, all stages),
# compile_graph_stage3 and compile_graph_stage3_nosam (train.compile + train.cuda_graph, stage 3 only:
# compiling each stage costs minutes), eager (what a plain `cmafnet train --config paper` does).
# Missing Python packages (pydantic, pyyaml, kornia, ...) come from wheels carried in the tree (`wheels/`
# or `.whl/`, e.g. run(carry=[".whl"])); the package itself is used from `src/`.
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
DEVICE=${GPU_CHECK_DEVICE:-cuda}  # cpu only to try the script's mechanics

echo "== gpu_check $(date -u +%FT%TZ), budget ${BUDGET}s, OUT=$OUT"
{ nvidia-smi || true; "$PY" -V; "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|timm|kornia|pydantic|pyyaml|numpy|safetensors) " ; } \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" \
  || { echo "FATAL: torch/timm not importable"; exit 1; }

# ---- dependencies the package imports, from carried wheels when missing (no index)
missing() {
  "$PY" - <<'EOF'
import importlib.util
need = {"pydantic": "pydantic", "yaml": "pyyaml", "numpy": "numpy", "kornia": "kornia", "safetensors": "safetensors",
        "pandas": "pandas", "sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib", "tqdm": "tqdm"}
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
  [ -n "$MISSING" ] && echo "WARNING: still missing: $MISSING"
fi
"$PY" -c "import cmafnet, cmafnet.bench.acceptance; print('cmafnet', cmafnet.__version__, 'from', cmafnet.__file__)" \
  || { echo "FATAL: cmafnet not importable"; exit 1; }

# ---- 1. the trainer's speed, through `cmafnet train` (the JSON is rewritten after every variant)
T=$(( $(left) - ${GPU_CHECK_TESTS_S:-120} - 10 ))
echo "== trainer speed (budget ${T}s, $(left)s left)"
timeout -k 10 $(( T + 20 )) "$PY" -m cmafnet.bench.acceptance --out "$OUT" --device "$DEVICE" \
  --config "${GPU_CHECK_CONFIG:-paper}" --steps "${GPU_CHECK_STEPS:-32}" --budget-s "$T" \
  --variants "${GPU_CHECK_VARIANTS:-graph,compile_graph_stage3,compile_graph_stage3_nosam,eager}" \
  ${GPU_CHECK_ACCEPTANCE_ARGS:-} 2>&1 | tee "$OUT/acceptance.log"
echo "acceptance exit ${PIPESTATUS[0]}"

# ---- 2. the GPU tests (CUDA graphs of the stage step, mixed precision, compile, prefetch, ...)
T=$(( $(left) - 5 ))
if [ "$T" -ge 30 ]; then
  echo "== pytest -m gpu (timeout ${T}s)"
  timeout -k 10 "$T" "$PY" -m pytest -q -m gpu -p no:cacheprovider -p no:logging -o addopts="" --tb=short \
    --continue-on-collection-errors tests > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -30
else
  echo "== pytest -m gpu skipped: only $(left)s left"
fi
echo "== done in $(( $(date +%s) - START ))s"
