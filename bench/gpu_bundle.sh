#!/usr/bin/env bash
# Prepare, on a machine with the package registries, what the first GPU run carries to the device machine
# (which reaches no registry and cannot hold the 98 MB default-model wheel):
#   .gpu/wheels/   the wheels its image lacks (bench/gpu_bundle.txt), for CPython 3.12 on x86-64 Linux
#   .gpu/smollm2/  the converted SmolLM2 folder without its weights (config + tokenizer, 3.5 MB): with
#                  FIS_SMOLLM2_FOLDER it serves the tokenizer, tiny-random, and a random-init SmolLM2-135M
# .gpu/ is git-ignored; name it in the device call's `carry`. Uses .venv (make install) unless PYTHON is set.
# GPU_PYTHON_VERSION (default 3.12, the device image's) picks the wheels' Python (3.11 for a rehearsal here).
#   bash bench/gpu_bundle.sh && (device) bash bench/gpu_check.sh        rehearsal here: bash bench/gpu_check.sh --rehearse
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
mkdir -p .gpu/wheels .gpu/smollm2
platforms=()
for n in 2_28 2_27 2_17 2014 1; do
  case $n in 2014|1) platforms+=(--platform "manylinux${n}_x86_64");; *) platforms+=(--platform "manylinux_${n}_x86_64");; esac
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp "${platforms[@]}" \
  -d .gpu/wheels -r bench/gpu_bundle.txt
"$PY" - <<'PY'
import shutil
from pathlib import Path

from fis_interventions.models import DEFAULT_MODEL, has_weights, resolve_model

source, target = resolve_model(DEFAULT_MODEL).folder, Path(".gpu/smollm2")
for path in source.iterdir():
    if path.is_file() and path.suffix not in (".safetensors", ".bin") and not path.name.endswith(".index.json"):
        shutil.copy2(path, target / path.name)
assert not has_weights(target), "weights must not travel (the device call carries 64 MiB at most)"
PY
total=$(du -sb .gpu | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo ".gpu: $((total / 1024)) KiB ($(ls .gpu/wheels | wc -l) wheels); with the working tree $(((total + tree) / 1048576)) MiB of 64"
[ $((total + tree)) -lt $((64 * 1048576)) ] || { echo "over the device call's 64 MiB" >&2; exit 1; }
