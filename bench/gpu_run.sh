#!/usr/bin/env bash
# The first run on a GPU, in one command: every bench/gpu_check section in its own process
# with its own time limit (the graph-safety probe first), then the Triton compile check, each
# report printed as it comes and written under OUT after every section, so a run cut short or a
# hung section keeps everything measured before it. Needs the machine's torch and Triton only
# (no install, no network): it runs from the checkout. The whole stays under 9 minutes (the
# limits below add up to 8.5; a section is not started past the deadline).
#
#   bash bench/gpu_run.sh --out DIR          on a GPU, real sizes
#   bash bench/gpu_run.sh --toy --out DIR    toy sizes on CPU (Triton's interpreter): the test
#
# OUT receives gpu-check-<device>.json / .md (every section), compile-check.json / .md and
# gpu-run.log (all output). GPU_RUN_LIMITS="rollout=60 loss=30" overrides section limits (s);
# "compile=" the compile check's, "deadline=" the whole run's.
# Exit status: 0 when every section and the compile check passed.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PYTHON:-python3}
TOY=() OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --toy) TOY=(--toy); shift ;;
    --out) OUT=${2:-}; shift 2 || { echo "gpu_run.sh: --out needs a folder" >&2; exit 2; } ;;
    *) echo "gpu_run.sh: unknown argument '$1' (usage: bash bench/gpu_run.sh [--toy] --out DIR)" >&2
       exit 2 ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "gpu_run.sh: --out DIR is required (the folder the results are written to)" >&2
  exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu-run.log"
export PYTHONPATH="$ROOT:$HERE${PYTHONPATH:+:$PYTHONPATH}"
if [ ${#TOY[@]} -gt 0 ]; then export TRITON_INTERPRET=1 MAPO_FAST_BACKEND=triton; fi

# section -> seconds (order: graph safety first, the long rollout sections last)
SECTIONS=(graph_safety loss paged_attention crops advantage rollout decode_graphs)
declare -A LIMIT=([graph_safety]=75 [loss]=90 [paged_attention]=75 [crops]=45 [advantage]=30
                  [rollout]=90 [decode_graphs]=60)
COMPILE_LIMIT=45
DEADLINE=540
for pair in ${GPU_RUN_LIMITS:-}; do
  name=${pair%%=*} value=${pair#*=}
  if ! [[ "$value" =~ ^[0-9]+$ ]] || { [ -z "${LIMIT[$name]+x}" ] && [ "$name" != compile ] \
      && [ "$name" != deadline ]; }; then
    echo "gpu_run.sh: GPU_RUN_LIMITS: bad entry '$pair' (sections: ${SECTIONS[*]}," \
         "compile, deadline)" >&2
    exit 2
  fi
  case "$name" in
    compile) COMPILE_LIMIT=$value ;;
    deadline) DEADLINE=$value ;;
    *) LIMIT[$name]=$value ;;
  esac
done

say() { echo "$@" | tee -a "$LOG"; }
status=0
start=$SECONDS
: > "$LOG"
say "[gpu-run] $(date -u +%FT%TZ) out=$OUT toy=${TOY[*]:-no}"
cd "$ROOT"
for name in "${SECTIONS[@]}"; do
  if (( SECONDS - start + LIMIT[$name] > DEADLINE )); then
    say "[gpu-run] $name: not started (the run's $DEADLINE s deadline)"
    status=1
    continue
  fi
  say "[gpu-run] $name (limit ${LIMIT[$name]} s)"
  timeout --kill-after=10 "${LIMIT[$name]}" "$PY" -m gpu_check "${TOY[@]}" \
      --only "$name" --append --repeats 3 --out "$OUT" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "[gpu-run] $name: stopped by its ${LIMIT[$name]} s limit"
    "$PY" -m gpu_check "${TOY[@]}" --timed-out "$name" --after "${LIMIT[$name]}" \
        --out "$OUT" 2>&1 | tee -a "$LOG"
    status=1
  elif [ "$rc" -ne 0 ]; then
    status=1
  fi
done
say "[gpu-run] compile check (limit $COMPILE_LIMIT s)"
env -u TRITON_INTERPRET timeout --kill-after=10 "$COMPILE_LIMIT" "$PY" -m mapo_fast.kernels.compile_check \
    --json "$OUT/compile-check.json" --md "$OUT/compile-check.md" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
say "[gpu-run] done in $((SECONDS - start)) s, status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
