# Device call 1: environment, then the client paths (train_on_node / evaluate_on_node) on CPU vs CUDA.
set -o pipefail
source notes/gpu-check/setup.sh || exit 1
{ nvidia-smi; nproc; free -g; python3 -c "import sys,torch,flwr,opacus,pandas,numpy; print(sys.version); print('torch',torch.__version__,'cuda',torch.cuda.is_available(),torch.version.cuda); print('flwr',flwr.__version__,'opacus',opacus.__version__,'pandas',pandas.__version__,'numpy',numpy.__version__)"; } 2>&1 | tee $OUT/env.txt
P="python3 benchmarks/gpu_paths.py"
timeout 250 $P --data .gpudata/ml-latest-small --sites 5 --rounds 3 --devices cpu cuda \
  --modes nodp dp-user dp-interaction --override 'dp-interaction={"dp-batch-size": 256, "local-epochs": 1}' 2>&1 | tee $OUT/paths_ml.log
timeout 100 $P --data synthetic:users=5000,items=20000,seed=1 --sites 5 --rounds 2 --devices cpu cuda --modes nodp 2>&1 | tee $OUT/paths_big_nodp.log
timeout 100 $P --data synthetic:users=5000,items=20000,seed=1 --sites 5 --rounds 2 --devices cuda --modes dp-user dp-interaction \
  --override 'dp-interaction={"dp-batch-size": 256, "local-epochs": 1}' 2>&1 | tee $OUT/paths_big_dp_cuda.log
echo CALL1 DONE
