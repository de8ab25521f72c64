# Quiet timing on the device machine's CPU, pinned to 2 cores (taskset -c 0,1): the same
# benchmarks as on the 2-core dev machine, without other sessions' load.
set -o pipefail
source notes/gpu-check/setup.sh || exit 1
{ lscpu | grep -E "Model name|^CPU\(s\)|MHz"; git log --oneline -1; } 2>&1 | tee $OUT/env.txt
P="taskset -c 0,1 python3"
timeout 330 $P benchmarks/dp_overhead.py --items 10000 100000 1000000 --threads 2 2>$OUT/dp_overhead.log | tail -1 > $OUT/dp_overhead.json
tail -25 $OUT/dp_overhead.log
timeout 200 $P benchmarks/serving_latency.py --items 10000 100000 1000000 2>$OUT/serving_latency.log | tail -1 > $OUT/serving_latency.json
tail -30 $OUT/serving_latency.log
echo CALL DONE
