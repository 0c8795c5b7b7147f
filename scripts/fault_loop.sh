#!/usr/bin/env bash
# Runs the fault, reliability and deploy tests ROUNDS times in a row beside one busy process per core,
# and counts the rounds that failed: the check that these tests wait on events, not on the machine's speed.
#   bash scripts/fault_loop.sh 20            # logs under ${LOG_DIR:-/tmp/fault-loop}
# Everything runs at the same niceness, so the busy processes compete with the tests as an equal.
set -uo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-20}"
log_dir="${LOG_DIR:-/tmp/fault-loop}"
mkdir -p "$log_dir"
. .venv/bin/activate
export OMP_NUM_THREADS=1

busy=()
for _ in $(seq "$(nproc)"); do
    python -c 'while True: pass' &
    busy+=($!)
done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT

failed=0
for round in $(seq "$rounds"); do
    start=$(date +%s)
    if python -m pytest -q -p no:cacheprovider -n "${TEST_PROCESSES:-2}" --dist worksteal \
        tests/service/test_faults_api.py tests/service/test_faults_jobs.py tests/service/test_faults_redis.py \
        tests/service/test_faults_workers.py tests/service/test_reliability.py tests/deploy \
        >"$log_dir/round-$round.log" 2>&1; then
        verdict=passed
    else
        verdict=FAILED
        failed=$((failed + 1))
    fi
    echo "round $round/$rounds: $verdict in $(( $(date +%s) - start )) s, $(tail -1 "$log_dir/round-$round.log")"
done
echo "$failed of $rounds rounds failed (logs in $log_dir)"
[ "$failed" -eq 0 ]
