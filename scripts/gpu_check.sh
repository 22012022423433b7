#!/usr/bin/env bash
# The GPU check (issue 17): kernel correctness, bench rows, the same shapes in PyTorch and a
# short real run, in one go on one GPU, under 8 minutes, results under $OUT.
#
#   bash scripts/gpu_check.sh --fetch   # HERE (network): wheels into .whl/, a text into .gpu_data/
#   bash scripts/gpu_check.sh           # ON THE GPU MACHINE, from the repo root (see docs/performance.md)
#   DRY_RUN=1 OUT=/tmp/gpu_dry bash scripts/gpu_check.sh   # or --dry-run: tiny shapes on the CPU
#   ONLY="attention steps" bash scripts/gpu_check.sh        # a rerun of some sections (shell patterns)
#
# Budgets on the H200 (seconds, each a hard `timeout`; the whole run is cut at TOTAL_BUDGET_S;
# each Python process also pays ~5-10 s to import and start CUDA):
#   setup: install carried wheels, env.txt, bf16 matmul probe      20
#   1a attention backends vs XLA (fwd + grads, bf16 + f32)         35
#   1b train steps on the GPU vs the CPU                           30
#   2  bench gpt2_124m 45, gpt2_355m 55, llama_1b 65, packed 30   195
#   3  torch 124m 15, 355m 18, 1b 22, torch.compile 124m 40        95
#   4  real run: 300 steps GPT-2 124M, torch twin, step timing    100
#   total                                                         475 at most (TOTAL_BUDGET_S), under 8 min
# The dry run scales every budget by BUDGET_SCALE (default 4 there: a CPU compiles slower).
#
# $OUT holds at most 8 files (the device tool returns no more): env.txt, summary.md,
# attention.json, steps.json, bench.json, torch.json, realrun.json, log.txt. Everything else
# stays in $WORK. Each section runs in its own process, continues past failures, and the
# summary is rewritten after every section, so a cut run still returns what it measured.

set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [ "${1:-}" = "--fetch" ]; then
  # Packages the GPU machine lacks (its image has jax 0.11, flax, optax, orbax, transformers,
  # torch; not these), as Python 3.12 x86-64 wheels, and the real run's text: both ignored by git.
  set -e
  mkdir -p .whl .gpu_data
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 datasets==5.2.0 \
    dill==0.4.1 multiprocess==0.70.19 tensorboardX==2.6.5 importlib_resources==6.5.2
  cp ../shared/data/tinyshakespeare.txt .gpu_data/ 2>/dev/null || cp /work/shared/data/tinyshakespeare.txt .gpu_data/
  du -sh .whl .gpu_data
  exit 0
fi
if [ "${1:-}" = "--dry-run" ]; then export DRY_RUN=1; fi
export DRY_RUN=${DRY_RUN:-0}

OUT=${OUT:-/tmp/gpu_check_out}
WORK=${WORK:-/tmp/gpu_check_work}
# The dry run's CPU is slower than the GPU at compiling: its budgets are scaled up.
SCALE=${BUDGET_SCALE:-1}
[ "$DRY_RUN" != "0" ] && SCALE=${BUDGET_SCALE:-4}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-$(( 475 * SCALE ))}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK"/*.json "$WORK"/sections.tsv "$WORK"/jax_cache  # each run compiles from scratch
: > "$OUT/log.txt"
START=$(date +%s)

export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="$WORK/jax_cache"   # the real run's step is compiled twice
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}  # one process at a time
export TOKENIZERS_PARALLELISM=false
if [ "$DRY_RUN" != "0" ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
fi

# Carried wheels (docs/performance.md): install only what is missing, never from the network.
SITE=""
if [ "$DRY_RUN" = "0" ] && ls .whl/*.whl >/dev/null 2>&1; then
  if ! $PY -c "import grain, ml_collections, datasets, tensorboardX" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$OUT/log.txt" 2>&1 && SITE=/tmp/site
  fi
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

# The real run's text: a carried copy, a shared/ in the checkout, the one beside it, else stdlib.
DATA=stdlib
for f in "${GPU_CHECK_DATA:-}" .gpu_data/tinyshakespeare.txt shared/data/tinyshakespeare.txt \
         ../shared/data/tinyshakespeare.txt; do
  if [ -n "$f" ] && [ -f "$f" ]; then DATA=$(cd "$(dirname "$f")" && pwd)/$(basename "$f"); break; fi
done

summary() { $PY scripts/gpu_check.py summary "$OUT" "$WORK" >>"$OUT/log.txt" 2>&1; }

# section NAME BUDGET_S CMD...: runs CMD under `timeout`, logs, records rc and seconds.
section() {
  local name=$1 budget=$(( $2 * SCALE )); shift 2
  if [ -n "${ONLY:-}" ]; then  # ONLY="attention bench_*": run just these sections (shell patterns)
    local pattern wanted=0
    for pattern in $ONLY; do case "$name" in $pattern) wanted=1;; esac; done
    [ "$wanted" = 0 ] && return
  fi
  local elapsed=$(( $(date +%s) - START ))
  local left=$(( TOTAL_BUDGET_S - elapsed ))
  if [ "$left" -lt 8 ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$budget" >>"$WORK/sections.tsv"
    echo "== $name: skipped, out of time" | tee -a "$OUT/log.txt"
    return
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "== $name (budget ${budget}s, at ${elapsed}s)" | tee -a "$OUT/log.txt"
  local t0=$(date +%s)
  timeout -k 5 "$budget" "$@" --budget-s $(( budget - 3 )) >>"$OUT/log.txt" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$budget" >>"$WORK/sections.tsv"
  echo "   rc $rc in ${dt}s" | tee -a "$OUT/log.txt"
  summary
}

G="$PY scripts/gpu_check.py"
# A torch process keeps JAX (which jaxllm's modules import) off the GPU, so it holds no memory pool.
TORCH_G="env JAX_PLATFORMS=cpu $G"
export GPU_CHECK_WORK="$WORK"

# ---- setup: versions and the card ----
{
  echo "date: $(date -u +%FT%TZ)  dry_run: $DRY_RUN  data: $DATA  carried site: ${SITE:-none}"
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  $PY -c "import grain, ml_collections, datasets, tensorboardX; print('grain, ml_collections, datasets, tensorboardX import: ok')"
  $PY -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9a-z-]*|flax|optax|orbax-checkpoint|grain|ml.collections|datasets|transformers|torch|tokenizers|numpy|tensorboardx|triton) '
} >"$OUT/env.txt" 2>&1
section env 20 $G env "$WORK/env.json"
cat "$WORK/env.json" >>"$OUT/env.txt" 2>/dev/null

# ---- 1. kernel correctness ----
section attention 35 $G attention "$OUT/attention.json"
section steps 30 $G steps "$OUT/steps.json" "$WORK"

# ---- 2. bench rows, one process each ----
section bench_gpt2_124m 45 $G bench-row gpt2_124m "$WORK/bench_gpt2_124m.json"
section bench_gpt2_355m 55 $G bench-row gpt2_355m "$WORK/bench_gpt2_355m.json"
section bench_llama_1b 65 $G bench-row llama_1b "$WORK/bench_llama_1b.json"
section bench_gpt2_124m_packed 30 $G bench-row gpt2_124m_packed "$WORK/bench_gpt2_124m_packed.json" \
  --start-from "$WORK/bench_gpt2_124m.json"
$G merge "$OUT/bench.json" "$WORK"/bench_gpt2_124m.json "$WORK"/bench_gpt2_355m.json \
  "$WORK"/bench_llama_1b.json "$WORK"/bench_gpt2_124m_packed.json >>"$OUT/log.txt" 2>&1
summary

# ---- 3. the same shapes in transformers + torch (same batch as the jaxllm row) ----
section torch_gpt2_124m 15 $TORCH_G torch-row gpt2_124m "$WORK/bench_gpt2_124m.json" "$WORK/torch_gpt2_124m.json"
section torch_gpt2_355m 18 $TORCH_G torch-row gpt2_355m "$WORK/bench_gpt2_355m.json" "$WORK/torch_gpt2_355m.json"
section torch_llama_1b 22 $TORCH_G torch-row llama_1b "$WORK/bench_llama_1b.json" "$WORK/torch_llama_1b.json"
section torch_gpt2_124m_compile 40 $TORCH_G torch-row gpt2_124m "$WORK/bench_gpt2_124m.json" \
  "$WORK/torch_gpt2_124m_compile.json" --compile
$G merge "$OUT/torch.json" "$WORK"/torch_gpt2_124m.json "$WORK"/torch_gpt2_355m.json "$WORK"/torch_llama_1b.json \
  "$WORK"/torch_gpt2_124m_compile.json >>"$OUT/log.txt" 2>&1
summary

# ---- 4. a short real run beside torch ----
section realrun 100 $G realrun "$OUT/realrun.json" "$WORK" "$DATA"

summary
echo "total $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | wc -l)" | tee -a "$OUT/log.txt"
cat "$OUT/summary.md"
