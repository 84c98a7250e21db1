#!/usr/bin/env bash
# On a GPU machine, after scripts/gpu_machine.sh has put Flower and Ray in place: the GPU
# tests, how trainings share the card (benchmarks/sharing.py), BatchNorm recalibration eager
# against recorded (BENCHMARKS 4d), one FedAvg run of the gpu preset alone (5 rounds), then
# the gpu preset's suite for one seed with three arms side by side, stopped after
# SUITE_SECONDS or when BUDGET runs out. OUT_DIR gets steps.txt (what each step gave), the
# benchmarks' JSON, rounds.txt (the suite's round times) and logs.tgz: the logs, metrics and
# summaries (no model files), packed again after every step, since a lent machine sends back
# at most 8 files. TESTS=0, SHARING=0, RECALIBRATION=0, ALONE=0 or SUITE=0 leaves out that step;
# TESTS_K picks the GPU tests (pytest -k, default "cuda or gpu").
# BUDGET (seconds, default 520): the whole script ends within it, each step's time limit cut
# to what is left, so that one call of a lent machine's 10 minutes, unpacking included, brings
# every step's result back.
# MPS=auto (the default): when the sharing step measured processes under MPS at least 10 %
# faster than without, the run alone and the suite get --mps; MPS=0 never, MPS=1 always.
#
#   bash scripts/gpu_machine.sh -- bash scripts/gpu_checks.sh OUT_DIR [SUITE_SECONDS] [RUNNER FLAGS...]
#
# For example, with torch.compile's step: ... gpu_checks.sh out 330 --compile
# The whole comparison (3 seeds) alone: BUDGET=570 TESTS=0 SHARING=0 RECALIBRATION=0 ALONE=0 ... gpu_checks.sh out 560 --seeds 0 1 2
set -u
if [ "$#" -lt 1 ]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
OUT_DIR="$1"
SUITE_SECONDS="${2:-330}"
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$OUT_DIR"
LOGS=results/gpu-checks-logs  # on this machine: packed into OUT_DIR/logs.tgz with the runs' results
rm -rf "$LOGS" results/gpu-alone results/gpu-checks  # a warm machine's last call must not resume
mkdir -p "$LOGS"
# A step that crashes in native code (a CUDA graph's replay, a driver) leaves its Python stack in its log.
export PYTHONFAULTHANDLER=1
# A step still running KILL_AFTER seconds after its limit's SIGTERM (stuck in native code, where
# Python cannot act on the signal) is killed, so that the steps after it still run. The sharing
# benchmark needs up to 25 s of it to end its processes and stop its MPS daemon.
KILL_AFTER=30
start=$(date +%s)
BUDGET="${BUDGET:-520}"
pack() {
    local paths=("$LOGS") run
    for run in results/gpu-alone results/gpu-checks; do [ -d "$run" ] && paths+=("$run"); done
    tar czf "$OUT_DIR/logs.tgz.part" --exclude='*.pt' "${paths[@]}" && mv "$OUT_DIR/logs.tgz.part" "$OUT_DIR/logs.tgz"
}
step() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT_DIR/steps.txt"; pack; }
# The smaller of CAP and what is left of BUDGET, less RESERVE for the steps that must follow (at least 1).
limit() {
    local left=$(( BUDGET - ($(date +%s) - start) - ${2:-0} ))
    local cap="$1"
    echo $(( left < cap ? (left > 1 ? left : 1) : cap ))
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT_DIR/steps.txt"
python3 -c "import torch, flwr, ray; print('torch', torch.__version__, 'flwr', flwr.__version__, 'ray', ray.__version__)" \
    | tee -a "$OUT_DIR/steps.txt"
echo "$(nproc) CPU cores; nvidia-cuda-mps-control: $(command -v nvidia-cuda-mps-control || echo none)" | tee -a "$OUT_DIR/steps.txt"
if [ "${TESTS:-1}" != 0 ]; then
    # The card-sharing benchmark after them needs about 100 s for its figures: the tests leave it
    # that much (a tight BUDGET once cut it off before its first JSON).
    timeout -k "$KILL_AFTER" "$(limit 200 $(( ${SHARING:-1} != 0 ? 150 : 60 )))" python3 -m pytest -q -p no:cacheprovider tests/test_training.py tests/test_fusion.py -k "${TESTS_K:-cuda or gpu}" \
        > "$LOGS/gpu_tests.log" 2>&1
    step "GPU tests: exit $? ($(tail -1 "$LOGS/gpu_tests.log"))"
fi
if [ "${SHARING:-1}" != 0 ]; then
    timeout -k "$KILL_AFTER" "$(limit 240 60)" python3 -m benchmarks.sharing > "$OUT_DIR/sharing.json" 2> "$LOGS/sharing.log"
    step "sharing benchmark: exit $? ($(if [ -s "$OUT_DIR/sharing.json" ]; then python3 - "$OUT_DIR/sharing.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(", ".join(f"{k} {v:,.0f} img/s" for k, v in s["images_per_s"].items()), "| MPS:", s["mps"], "| failed:", s.get("failed"),
      *(["| stopped:", s["stopped"]] if "stopped" in s else []))
PY
        else tail -c 300 "$LOGS/sharing.log" | tr '\n' ' '; fi))"
fi
if [ "${RECALIBRATION:-1}" != 0 ]; then
    timeout -k "$KILL_AFTER" "$(limit 150 60)" python3 - > "$OUT_DIR/recalibration.json" 2> "$LOGS/recalibration.log" <<'PY'
import json, tempfile
from pathlib import Path
from benchmarks.cuda import recalibration
from benchmarks.measure import Settings
print(json.dumps(recalibration(Settings(tiny=False, repeats=3, threads=4, work_dir=Path(tempfile.mkdtemp())))))
PY
    step "recalibration benchmark (4d): exit $? ($(tr -d '\n ' < "$OUT_DIR/recalibration.json" | cut -c1-300))"
fi
MPS_FLAG=()
case "${MPS:-auto}" in
    1) MPS_FLAG=(--mps) ;;
    auto) if [ -s "$OUT_DIR/sharing.json" ] && python3 - "$OUT_DIR/sharing.json" <<'PY'
import json, sys
ips = json.load(open(sys.argv[1]))["images_per_s"]
sys.exit(0 if ips.get("processes_mps", 0) >= 1.1 * ips["processes"] else 1)
PY
          then MPS_FLAG=(--mps); fi ;;
esac
step "runs below with: ${MPS_FLAG[*]:-no MPS} (MPS=${MPS:-auto})"
if [ "${ALONE:-1}" != 0 ]; then
    # Issue 12's item 2 (a round <= 1.3x its slowest client's training) is about one run alone.
    timeout -k "$KILL_AFTER" "$(limit 180 60)" python3 run_federated_mergenet.py --preset gpu --no-fusion --rounds 5 \
        --output-dir results/gpu-alone "${MPS_FLAG[@]}" "$@" > "$LOGS/alone.log" 2>&1
    step "one FedAvg run alone, 5 rounds: exit $? ($(python3 -c 'import json, sys
times = json.load(open(sys.argv[1]))["round_times"] or {}
print({key: round(value, 3) if isinstance(value, float) else value for key, value in times.items()})' \
        results/gpu-alone/summary.json 2>&1 | cut -c1-600))"
fi
if [ "${SUITE:-1}" != 0 ]; then
    SUITE_SECONDS=$(limit "$SUITE_SECONDS" $(( 20 + KILL_AFTER )))  # the rounds' summary and the archive follow
    timeout -k "$KILL_AFTER" "$SUITE_SECONDS" python3 run_federated_mergenet.py --suite --preset gpu --seeds 0 --jobs 3 \
        --results-root results/gpu-checks "${MPS_FLAG[@]}" "$@" > "$LOGS/suite.log" 2>&1
    step "suite: exit $? (124: stopped after $SUITE_SECONDS s; 137: killed $KILL_AFTER s after that)"
    # Its estimate and when each unit started and ended (on the command's clock), for a stopped suite too.
    grep -E '^(estimated time|=== |suite: )' "$LOGS/suite.log" | sed 's/^/    /' | tee -a "$OUT_DIR/steps.txt"
    python3 - results/gpu-checks <<'PY' | tee "$OUT_DIR/rounds.txt"
import sys
from pathlib import Path
from fedmergenet.results import read_metrics, round_times
for run in sorted(Path(sys.argv[1]).glob("seed*/*/metrics.jsonl")):
    times = round_times(read_metrics(run.parent)) or {}
    print(f"{run.parent.parent.name}/{run.parent.name}", {key: round(value, 3) if isinstance(value, float) else value for key, value in times.items()})
PY
fi
step "done"
