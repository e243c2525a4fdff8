#!/usr/bin/env bash
# The whole "faster than dense, measured" benchmark in one command:
#
#     bash benchmarks/run_all.sh                  # ROUNDS=3 by default
#     IMPORT_TOMOE="outputs/SmolLM2-135M-Instruct-ToMoE-E8-p50" bash benchmarks/run_all.sh
#
# sweep (ToMoE + static baseline at p = 0.7 0.6 0.5 0.4 with the RECIPE, default
# recipes/tomoe_50.yaml, whose target ratio alone the sweep changes; resumes
# finished runs; IMPORT_TOMOE reuses finished examples/smollm2_tomoe.py outputs
# trained with the same settings) -> quality (lm-eval perplexity, context 512,
# float32) -> speed (decode and prefill vs dense, float32 and bfloat16, eager and
# compiled (COMPILE=0 skips; COMPILED_RATIO picks the models, default p50), the
# shared layout also through the CPU kernel) -> decode profile -> plot -> report
# (benchmarks/RESULTS.md + PNGs, and the result JSONs copied to benchmarks/results/
# to be committed with them). Methods: SWEEP_ARGS="--methods tomoe shared static
# flap flap-uniform" (the default). About 30 minutes per
# ToMoE model on a 2-core CPU, plus about an hour of evaluation. For a smoke test
# on a tiny model, set MODEL (dense folder), RECIPE, REPORT_DIR and extra flags in
# SWEEP_ARGS / QUALITY_ARGS / SPEED_ARGS / PROFILE_ARGS
# (tests/integration/test_benchmarks.py does).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

ROOT=${BENCH_ROOT:-outputs/bench}
RECIPE=${RECIPE:-recipes/tomoe_50.yaml}
ROUNDS=${ROUNDS:-3}
DTYPES=${DTYPES:-float32 bfloat16}
REPORT_DIR=${REPORT_DIR:-benchmarks}
read -r -a SWEEP_EXTRA <<< "${SWEEP_ARGS:-}"
read -r -a QUALITY_EXTRA <<< "${QUALITY_ARGS:-}"
read -r -a SPEED_EXTRA <<< "${SPEED_ARGS:-}"
read -r -a PROFILE_EXTRA <<< "${PROFILE_ARGS:-}"
read -r -a IMPORTS <<< "${IMPORT_TOMOE:-}"

if [ -n "${MODEL:-}" ]; then
  DENSE=$MODEL
else
  # importing the package prints an llm-compressor warning on stdout: keep the last line
  DENSE=$(python -c 'from tomoe_modifier.assets import prepare_smollm2
print(prepare_smollm2())' | tail -n 1)
fi

IMPORT_ARGS=()
if [ "${#IMPORTS[@]}" -gt 0 ]; then IMPORT_ARGS=(--import-tomoe "${IMPORTS[@]}"); fi
python -m benchmarks.sweep --model "$DENSE" --recipe "$RECIPE" --out-root "$ROOT" \
  "${IMPORT_ARGS[@]}" "${SWEEP_EXTRA[@]}"

MODELS=("$DENSE")
for dir in "$ROOT"/models/{tomoe,shared,flap,flap-uniform,static}-p*; do
  if [ -f "$dir/bench_meta.json" ]; then MODELS+=("$dir"); fi
done
# speed: every model but FLAP (a quality baseline; Wanda-sp is the deployable
# static model) eagerly; the models at the compiled ratio also compiled
SPEED_MODELS=("$DENSE")
COMPILED_MODELS=("$DENSE")
for dir in "$ROOT"/models/{tomoe,shared,static}-p*; do
  if [ -f "$dir/bench_meta.json" ]; then SPEED_MODELS+=("$dir"); fi
  case "$dir" in *-p"${COMPILED_RATIO:-50}") COMPILED_MODELS+=("$dir");; esac
done

python -m benchmarks.quality "${MODELS[@]}" --out-dir "$ROOT/results/quality" \
  "${QUALITY_EXTRA[@]}"
for dtype in $DTYPES; do
  python -m benchmarks.speed "${SPEED_MODELS[@]}" --rounds "$ROUNDS" --dtype "$dtype" \
    --cpu-kernels --out "$ROOT/results/speed-$dtype-eager.json" "${SPEED_EXTRA[@]}"
  if [ "${COMPILE:-1}" = 1 ]; then
    python -m benchmarks.speed "${COMPILED_MODELS[@]}" --rounds "$ROUNDS" \
      --dtype "$dtype" --mode compiled --cpu-kernels --no-memory \
      --out "$ROOT/results/speed-$dtype-compiled.json" "${SPEED_EXTRA[@]}"
  fi
done
TOMOE_MODELS=()
for dir in "$ROOT"/models/tomoe-p*; do
  if [ -f "$dir/bench_meta.json" ]; then TOMOE_MODELS+=("$dir"); fi
done
python -m benchmarks.profile_decode "$DENSE" "${TOMOE_MODELS[@]}" \
  --rounds "$ROUNDS" --out "$ROOT/results/profile-float32.json" "${PROFILE_EXTRA[@]}"
python -m benchmarks.plot --results "$ROOT/results" --out-dir "$REPORT_DIR"
python -m benchmarks.report --results "$ROOT/results" --out "$REPORT_DIR/RESULTS.md"
# the JSONs behind the report go next to it (committed), so RESULTS.md can be
# regenerated from the repository alone: benchmarks.report --results benchmarks/results
mkdir -p "$REPORT_DIR/results"
cp -r "$ROOT/results/." "$REPORT_DIR/results/"
