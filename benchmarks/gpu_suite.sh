#!/usr/bin/env bash
# The one script run on the GPU machine, from the repository root:
#
#   bash benchmarks/gpu_suite.sh [STAGE ...]          (default: tests kernels models)
#
# Stages run in the order given; a failing stage is reported and the next still runs.
#   tests                  pytest -m gpu -q (GPU_TEST_PATHS; tests/distributed's need 2 GPUs) -> $OUT/pytest-gpu.xml
#   kernels[:ONLY]         python3 benchmarks/kernel_bench.py [--only ONLY]   -> $OUT/kernels-<gpu>.{json,md}
#   profile[:SPEC]         python3 benchmarks/profile_step.py SPEC --host (GPU kernels + host time)
#                          -> $OUT/profile-<spec>.txt (SPEC default llama3-8b:2:2048:bfloat16)
#   models[:ROWS[:PEERS]]  python3 benchmarks/models.py --rows ROWS --peers PEERS
#                          ROWS: ids, globs or aliases (main, t4, all), comma-separated (default all);
#                          PEERS: e.g. nbtune,unsloth (default hf,unsloth,nbtune)
#                          -> $OUT/models-<stamp>.json, $OUT/models.log, $OUT/RESULTS.md
#   trainer[:ROWS[:PEERS]] python3 benchmarks/trainer.py --rows ROWS --peers PEERS: the user's path, nbtune.finetune vs
#                          Unsloth + TRL vs TRL + peft + bnb on real token counts (ROWS default quick; PEERS default
#                          nbtune,unsloth,trl; ROWS dpo: the DPO rows, e.g. 'trainer:dpo:nbtune,unsloth,trl';
#                          ROWS grpo: the GRPO rows (generation tok/s beside step tok/s and memory), e.g.
#                          'trainer:grpo:nbtune,unsloth,trl';
#                          --assets .bench-assets when that folder was carried: make it here with
#                          `python benchmarks/trainer_data.py export .bench-assets`)
#                          -> $OUT/trainer-<stamp>.{json,md}, $OUT/trainer.log, $OUT/RESULTS.md
#   tune                   python3 benchmarks/tune_rms_norm_bwd.py (RMSNorm dw backward's launch shape) -> $OUT/tune-rms-norm-bwd.json
#   calibrate[:ONLY]       python3 benchmarks/calibrate.py measure [--only ONLY] (the planner's peak-memory grid)
#                          -> $OUT/calibration.json (copy over nbtune/planner/calibration.json, then `fit`)
#   multigpu[:STAGES]      python3 benchmarks/multi_gpu.py --stages STAGES (losses,throughput,contention,profile need 2 GPUs:
#                          the 2 x H200 machine; checkpointing and profile --profile-worlds 1 need one) -> $OUT/multi_gpu.json
# Before them (always): the wheels in .whl/*.whl, downloaded beforehand on a machine with network
# (the GPU machine needs none; benchmarks/README.md lists them, benchmarks/fetch_extra_wheels.sh gets
# nbtune's extras) -> /tmp/site (on PYTHONPATH), .whl/peer/*.whl (the Unsloth peer's set) ->
# /tmp/site_peer (first on PYTHONPATH of the unsloth process only), and nbtune itself
# (pip install --no-deps -e ., else the checkout on PYTHONPATH).
#
# Environment: OUT (results folder; default /tmp/nbtune-suite-out), SUITE_BUDGET_S (wall-clock
# seconds for all stages together, default 560; each stage gets what is left, and a stage that
# would start with under 40 s left is reported as not reached), MODELS_ARGS / KERNELS_ARGS /
# PYTEST_ARGS / MULTIGPU_ARGS / TRAINER_ARGS (extra arguments), CKPT_ROOT (/tmp/ckpt), PYTHON (python3).
set -u -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
export CKPT_ROOT=${CKPT_ROOT:-/tmp/ckpt}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/nbtune-suite-out}
BUDGET=${SUITE_BUDGET_S:-560}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1

declare -a SUMMARY=()
note() { SUMMARY+=("$(printf '%-22s %-34s %5ss' "$1" "$2" "$3")"); }
remaining() { echo $(( BUDGET - SECONDS )); }

# newest_wheels DIR: one wheel per distribution (the highest version), so that two fetches that left
# two versions of a package behind do not make pip refuse the whole set
newest_wheels() {
  ls "$1"/*.whl | awk -F/ '{print $NF}' | sort -t- -k1,1 -k2,2V \
    | awk -F- '{k=tolower($1)} k!=prev && prev!="" {print last} {prev=k; last=$0} END {if (last!="") print last}' \
    | sed "s|^|$1/|"
}

setup() {
  local t0=$SECONDS site=/tmp/site peer=/tmp/site_peer stamp
  if compgen -G ".whl/*.whl" >/dev/null; then
    stamp=$(stat -c "%n %s" .whl/*.whl | md5sum | cut -c1-32)
    if [[ -f $site/.nbtune-wheels && $(cat $site/.nbtune-wheels) == "$stamp" ]]; then
      echo "# wheels already in $site"
    elif $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $(newest_wheels .whl); then
      echo "$stamp" > "$site/.nbtune-wheels"
    else
      note setup:wheels "FAILED (pip install .whl)" $((SECONDS - t0))
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "# no .whl/: using the machine's packages only"
  fi
  if compgen -G ".whl/peer/*.whl" >/dev/null; then
    stamp=$(stat -c "%n %s" .whl/peer/*.whl | md5sum | cut -c1-32)
    if [[ -f $peer/.nbtune-wheels && $(cat $peer/.nbtune-wheels) == "$stamp" ]]; then
      echo "# peer wheels already in $peer"
    elif $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$peer" .whl/peer/*.whl; then
      echo "$stamp" > "$peer/.nbtune-wheels"
    else
      note setup:peer-wheels "FAILED (unsloth will be skipped)" $((SECONDS - t0))
    fi
    export NBTUNE_BENCH_PEER_SITE=$peer
  fi
  # nbtune: editable install (no network: no build isolation, no deps); else a copy on PYTHONPATH
  # checked from outside the checkout: from its root, python -c finds nbtune without any install, but
  # the benchmark scripts (started as benchmarks/x.py) and their peers do not
  if ! (cd / && $PY -c "import nbtune.kernels, nbtune.models") 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/nbtune-pip.log 2>&1 || true
    # checked from outside the checkout: from its root, python -c finds nbtune without any install, but
  # the benchmark scripts (started as benchmarks/x.py) and their peers do not
  if ! (cd / && $PY -c "import nbtune.kernels, nbtune.models") 2>/dev/null; then
      echo "# editable install did not work (tail of its log below); using the checkout on PYTHONPATH"
      tail -3 /tmp/nbtune-pip.log
      export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
  fi
  if $PY -c "import nbtune, nbtune.kernels, nbtune.models; print('# nbtune', nbtune.__version__, 'from', nbtune.__file__)"; then
    note setup ok $((SECONDS - t0))
  else
    note setup "FAILED (import nbtune)" $((SECONDS - t0))
  fi
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
}

# run_stage NAME CMD...: runs with the time left (minus a margin), records status and seconds
run_stage() {
  local name=$1; shift
  local left; left=$(remaining)
  if (( left < 40 )); then note "$name" "not reached (budget: ${left}s left)" 0; return; fi
  local t0=$SECONDS rc
  echo; echo "===== $name ($(( left - 10 ))s left): $*"
  timeout --signal=TERM --kill-after=15 $(( left - 10 )) "$@"; rc=$?
  local status=ok
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT (budget)"
  elif [[ $name == tests && $rc == 5 ]]; then status="no test collected (rc=5)"
  elif (( rc != 0 )); then status="FAILED rc=$rc"; fi
  note "$name" "$status" $((SECONDS - t0))
  return 0
}

stage_tests() {
  # shellcheck disable=SC2086
  # the folders that hold GPU tests (the others import notebook-only packages the GPU image lacks)
  local d paths=()
  for d in ${GPU_TEST_PATHS:-tests/kernels tests/models tests/reliability tests/distributed tests/finetune/test_optimizer.py tests/finetune/test_no_sync_gpu.py}; do
    [[ -e $d ]] && paths+=("$d")
  done
  # shellcheck disable=SC2086
  run_stage tests $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" ${PYTEST_ARGS:-} \
    "${paths[@]}"
  [[ -f $OUT/pytest-gpu.xml ]] && $PY - "$OUT/pytest-gpu.xml" <<'PY' || true
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
print(f"# pytest -m gpu: {s.get('tests')} tests, {s.get('failures')} failures, {s.get('errors')} errors, {s.get('skipped')} skipped")
PY
}

stage_kernels() {
  local only=$1 mark=/tmp/nbtune-suite.kernels.mark
  touch "$mark"
  # shellcheck disable=SC2086
  run_stage kernels $PY benchmarks/kernel_bench.py --out benchmarks/results ${only:+--only "$only"} ${KERNELS_ARGS:-}
  find benchmarks/results -maxdepth 1 -name 'kernels-*' -newer "$mark" -exec cp {} "$OUT/" \;
}

stage_models() {
  local rows=${1:-all} peers=${2:-hf,unsloth,nbtune} mark=/tmp/nbtune-suite.models.mark
  touch "$mark"; sleep 1
  local left; left=$(remaining)
  # shellcheck disable=SC2086
  run_stage "models:$rows" $PY benchmarks/models.py --rows "$rows" --peers "$peers" \
    --time-budget $(( left - 40 )) ${NBTUNE_BENCH_PEER_SITE:+--peer-site "$NBTUNE_BENCH_PEER_SITE"} ${MODELS_ARGS:-}
  local f
  for f in $(find benchmarks/results -maxdepth 1 -name 'models-*' -newer "$mark"); do
    case $f in
      *.json) cp "$f" "$OUT/"; MODEL_JSONS+=("$f") ;;
      *.log) cat "$f" >> "$OUT/models.log" ;;
    esac
  done
  [[ -f benchmarks/RESULTS.md ]] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
}

stage_trainer() {
  local rows=${1:-quick} peers=${2:-nbtune,unsloth,trl} mark=/tmp/nbtune-suite.trainer.mark
  local -a assets=()
  [[ -d .bench-assets ]] && assets=(--assets .bench-assets)
  touch "$mark"; sleep 1
  local left; left=$(remaining)
  # shellcheck disable=SC2086
  run_stage "trainer:$rows" $PY benchmarks/trainer.py --rows "$rows" --peers "$peers" --time-budget $(( left - 40 )) \
    ${assets[@]+"${assets[@]}"} ${NBTUNE_BENCH_PEER_SITE:+--peer-site "$NBTUNE_BENCH_PEER_SITE"} ${TRAINER_ARGS:-}
  local f
  for f in $(find benchmarks/results -maxdepth 1 -name 'trainer-*' -newer "$mark"); do
    case $f in
      *.json|*.md) cp "$f" "$OUT/" ;;
      *.log) cat "$f" >> "$OUT/trainer.log" ;;
    esac
  done
  [[ -f benchmarks/RESULTS.md ]] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
}

stage_profile() {
  local spec=${1:-llama3-8b:2:2048:bfloat16} name
  name=profile-$(tr ':' '-' <<<"$spec").txt
  # shellcheck disable=SC2086
  run_stage "profile" $PY benchmarks/profile_step.py "$spec" --variants offload --host ${PROFILE_ARGS:-} \
    > >(tee "$OUT/$name")
}

stage_tune() {
  run_stage tune $PY benchmarks/tune_rms_norm_bwd.py --out "$OUT"
}

stage_calibrate() {
  local only=$1 left; left=$(remaining)
  # shellcheck disable=SC2086
  run_stage calibrate $PY benchmarks/calibrate.py measure --out "$OUT/calibration.json" --budget-s $(( left - 90 )) \
    --ckpt-root "$CKPT_ROOT/calibration" ${only:+--only "$only"}
}

stage_multigpu() {
  local stages=${1:-losses,throughput}
  # shellcheck disable=SC2086
  run_stage "multigpu:$stages" $PY benchmarks/multi_gpu.py --out "$OUT" --stages "$stages" ${MULTIGPU_ARGS:-}
}

main() {
  echo "# nbtune gpu suite: stages ${*:-tests kernels models}, budget ${BUDGET}s, OUT=$OUT, CKPT_ROOT=$CKPT_ROOT"
  setup
  declare -ga MODEL_JSONS=()
  local stage rows peers stages=("$@")
  (( ${#stages[@]} )) || stages=(tests kernels models)
  for stage in "${stages[@]}"; do
    case $stage in
      tests) stage_tests ;;
      kernels) stage_kernels "" ;;
      kernels:*) stage_kernels "${stage#kernels:}" ;;
      profile) stage_profile "" ;;
      profile:*) stage_profile "${stage#profile:}" ;;
      models|models:*)
        IFS=: read -r _ rows peers <<<"$stage"
        stage_models "${rows:-all}" "${peers:-hf,unsloth,nbtune}" ;;
      trainer|trainer:*)
        IFS=: read -r _ rows peers <<<"$stage"
        stage_trainer "${rows:-quick}" "${peers:-nbtune,unsloth,trl}" ;;
      tune) stage_tune ;;
      calibrate) stage_calibrate "" ;;
      calibrate:*) stage_calibrate "${stage#calibrate:}" ;;
      multigpu) stage_multigpu "" ;;
      multigpu:*) stage_multigpu "${stage#multigpu:}" ;;
      *) note "$stage" "UNKNOWN stage (tests, kernels, profile, models, trainer, tune, calibrate, multigpu)" 0 ;;
    esac
  done
  echo; echo "===== summary (${SECONDS}s of ${BUDGET}s)"
  printf '%s\n' "${SUMMARY[@]}"
  if (( ${#MODEL_JSONS[@]} )); then
    $PY benchmarks/models.py --from-json "${MODEL_JSONS[@]}" --markdown '' --summary || true
  fi
  echo "# files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
}

main "$@" 2>&1 | tee -a "$OUT/suite.log"
