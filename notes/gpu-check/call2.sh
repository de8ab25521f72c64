# Device call 2: a real deployment (SuperLink + 2 SuperNodes on loopback) per device, then the quick test suite.
set -o pipefail
source notes/gpu-check/setup.sh || exit 1
nvidia-smi --query-compute-apps=timestamp,pid,process_name,used_memory --format=csv,noheader -l 1 > $OUT/smi_apps.csv 2>&1 &
timeout 330 python3 benchmarks/gpu_deployment.py --devices cpu cuda --modes nodp dp-user --rounds 3 \
  --keep-logs $OUT/deploy-logs 2>&1 | tee $OUT/deployment.log
timeout 200 python3 -m pytest -m "not simulation and not deployment" -q -p no:cacheprovider 2>&1 | tee $OUT/pytest_quick.log
echo CALL2 DONE
