#!/usr/bin/env bash
# The first-GPU-run check: one script, one GPU, under 10 minutes. Prints every number README quotes.
#   bash bench/gpu_check.sh            (from the repository root, with the project's venv active or PYTHON set)
# 1. the gpu-marked tests (tests/test_gpu.py, test_devices.py, test_battery*.py): weights on CUDA after load,
#    greedy continuation, battery CPU vs CUDA (fp32, bf16) + scale-1 exactness, 30 joint steps (fp32, bf16),
#    first-step gradients vs the CPU fast path, bf16 resume, sparse ops vs float64, harvest/screen/eval vs CPU,
#    host-sync budgets (printed with -s);
# 2. bench/peers.py --bf16 (our step vs sparsify under bf16), then fp32;
# 3. bench/battery.py on the GPU (speed-up vs the naive loop, peak CUDA memory).
set -u
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-$PWD}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 2
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
status=0
echo "== 1. gpu tests"
timeout 420 "$PY" -m pytest -q -s -m gpu tests -p no:cacheprovider -W ignore::FutureWarning || status=1
echo "== 2. peers, bf16 then fp32"
timeout 120 "$PY" bench/peers.py --bf16 --steps 20 || status=1
timeout 90 "$PY" bench/peers.py --steps 20 || status=1
echo "== 3. battery vs naive on the GPU"
timeout 150 "$PY" bench/battery.py --rows 64 --features 4 || status=1
exit $status
