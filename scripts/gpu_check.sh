#!/usr/bin/env bash
# The GPU check (issue #15), for a bare NVIDIA GPU machine: it needs this source checkout and a python3 with
# torch, torchvision, onnx, onnxruntime, numpy, pillow, scikit-learn, matplotlib, typer and rich. Nothing is
# pip-installed or carried: synthetic data, checkpoints (smallcnn trained on the GPU, the others random-init)
# and ONNX files are made on the spot, then `lungedge eval/bench --device cuda` run for googlenet,
# inception_v3, densenet121 and smallcnn. Results (JSON lines) land in --out (default: $OUT, else
# results/gpu-<host>-<time>); merge them with CPU rows: lungedge report --results results --results OUT.
#
#   bash scripts/gpu_check.sh                 # the whole check, under 7 minutes (--budget 420)
#   bash scripts/gpu_check.sh --dry-run       # facts and plan only (works without a GPU)
#   bash scripts/gpu_check.sh --help          # every option
#
# Exit codes: 0 done (skips say why), 1 a step failed, 2 bad arguments, 4 no NVIDIA GPU here.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py --python "$PY" "$@"
