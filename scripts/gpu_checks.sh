#!/usr/bin/env bash
# On a GPU machine, after scripts/gpu_machine.sh has put Flower and Ray in place: the GPU
# tests, how trainings share the card (benchmarks/sharing.py), BatchNorm recalibration eager
# against recorded (BENCHMARKS 4d), one FedAvg run of the gpu preset alone (5 rounds), then
# the gpu preset's suite for one seed with three arms side by side, stopped after
# SUITE_SECONDS; the logs, metrics and summaries (no model files) go to OUT_DIR. TESTS=0,
# SHARING=0, RECALIBRATION=0 or ALONE=0 leaves out that step.
#
#   bash scripts/gpu_machine.sh -- bash scripts/gpu_checks.sh OUT_DIR [SUITE_SECONDS] [RUNNER FLAGS...]
#
# For example, with torch.compile's step: ... gpu_checks.sh out 330 --compile
# The whole comparison (3 seeds) alone: TESTS=0 SHARING=0 RECALIBRATION=0 ALONE=0 ... gpu_checks.sh out 540 --seeds 0 1 2
set -u
if [ "$#" -lt 1 ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
OUT_DIR="$1"
SUITE_SECONDS="${2:-330}"
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$OUT_DIR"
start=$(date +%s)
step() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT_DIR/steps.txt"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/machine.txt"
python3 -c "import torch, flwr, ray; print('torch', torch.__version__, 'flwr', flwr.__version__, 'ray', ray.__version__)" \
    | tee -a "$OUT_DIR/machine.txt"
if [ "${TESTS:-1}" != 0 ]; then
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_training.py tests/test_fusion.py -k "cuda or gpu" \
        > "$OUT_DIR/gpu_tests.log" 2>&1
    step "GPU tests: exit $? ($(tail -1 "$OUT_DIR/gpu_tests.log"))"
fi
if [ "${SHARING:-1}" != 0 ]; then
    timeout 180 python3 -m benchmarks.sharing > "$OUT_DIR/sharing.json" 2> "$OUT_DIR/sharing.log"
    step "sharing benchmark: exit $? ($(tr -d '\n ' < "$OUT_DIR/sharing.json" | cut -c1-300))"
fi
if [ "${RECALIBRATION:-1}" != 0 ]; then
    timeout 150 python3 - > "$OUT_DIR/recalibration.json" 2> "$OUT_DIR/recalibration.log" <<'PY'
import json, tempfile
from pathlib import Path
from benchmarks.cuda import recalibration
from benchmarks.measure import Settings
print(json.dumps(recalibration(Settings(tiny=False, repeats=3, threads=4, work_dir=Path(tempfile.mkdtemp())))))
PY
    step "recalibration benchmark (4d): exit $? ($(tr -d '\n ' < "$OUT_DIR/recalibration.json" | cut -c1-300))"
fi
if [ "${ALONE:-1}" != 0 ]; then
    # Issue 12's item 2 (a round <= 1.3x its slowest client's training) is about one run alone.
    timeout 180 python3 run_federated_mergenet.py --preset gpu --no-fusion --rounds 5 \
        --output-dir results/gpu-alone "$@" > "$OUT_DIR/alone.log" 2>&1
    step "one FedAvg run alone, 5 rounds: exit $? ($(python3 -c 'import json, sys
print(json.load(open(sys.argv[1]))["round_times"])' results/gpu-alone/summary.json 2>&1 | cut -c1-400))"
fi
timeout "$SUITE_SECONDS" python3 run_federated_mergenet.py --suite --preset gpu --seeds 0 --jobs 3 \
    --results-root results/gpu-checks "$@" > "$OUT_DIR/suite.log" 2>&1
step "suite: exit $? (124: stopped after $SUITE_SECONDS s)"
tar czf "$OUT_DIR/suite.tgz" --exclude='*.pt' results/gpu-checks $([ -d results/gpu-alone ] && echo results/gpu-alone)
python3 - results/gpu-checks <<'PY' | tee "$OUT_DIR/rounds.txt"
import sys
from pathlib import Path
from fedmergenet.results import read_metrics, round_times
for run in sorted(Path(sys.argv[1]).glob("seed*/*/metrics.jsonl")):
    print(run.parent.name, round_times(read_metrics(run.parent)))
PY
step "done"
