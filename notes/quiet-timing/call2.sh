# Quiet timing of the local HTTP API (issue 6 target: >= 500 req/s, p99 <= 20 ms at 1e5 items on 2 cores):
# server and load generator together pinned to 2 cores of the lent machine's CPU; one state dir for both.
set -o pipefail
source notes/gpu-check/setup.sh || exit 1
P="taskset -c 0,1 python3"
mkdir -p /tmp/hb && $P -c "import sys; sys.path.insert(0, 'benchmarks'); import serving_http as s; from pathlib import Path; s.make_state(Path('/tmp/hb'), 100000, 2000, 64)" || exit 1
for precision in int8 fp32; do
  timeout 150 $P benchmarks/serving_http.py --items 100000 --precision $precision --state-dir /tmp/hb/state 2>&1 | tee $OUT/http_$precision.log | tail -3
done
echo CALL DONE
