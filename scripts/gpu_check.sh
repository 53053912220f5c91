#!/usr/bin/env bash
# One prepared check for a single-GPU machine (issue #6): bench and eval DenseNet121 and ResNet50 with
#   - the source framework on CUDA: PyTorch fp32 + fp16 (DenseNet121); Keras fp32 on the GPU (ResNet50 is a
#     Keras model, so it has no PyTorch runner),
#   - ONNX Runtime's CUDA execution provider on the fp32 and fp16 ONNX files,
#   - TensorRT engines (and ONNX Runtime's TensorRT provider) where TensorRT is installed.
# It writes JSON-lines results under $OUT, which `lungedge report --results results/ --results $OUT` merges.
#
# Needs: trained runs and exported ONNX files for both models (runs/, engines/), onnxruntime-gpu instead of
# onnxruntime for the CUDA provider, optionally tensorrt. Usage:
#   scripts/gpu_check.sh                    # defaults below
#   RUNS=runs ENGINES=engines OUT=results/gpu BATCH=1,8,32 scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LUNGEDGE=${LUNGEDGE:-.venv/bin/lungedge}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
ENGINES=${ENGINES:-engines}
OUT=${OUT:-results/gpu-$(hostname -s)}
BATCH=${BATCH:-1,8,32}
MODELS=${MODELS:-"densenet121 resnet50"}
EVAL_ARGS=${EVAL_ARGS:-}   # e.g. "--split splits/iq.json --data ../shared/data/iq-oth-nccd"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || {
  echo "error: no NVIDIA GPU here (nvidia-smi failed)"; exit 2; }
mkdir -p "$OUT"

providers=$($PY -c "import onnxruntime as o; print(','.join(o.get_available_providers()))")
echo "ONNX Runtime providers: $providers"
have_trt=0
if $PY -c "import tensorrt" 2>/dev/null; then have_trt=1; fi
echo "TensorRT importable: $have_trt"

backends="torch,keras"
case "$providers" in *CUDAExecutionProvider*) backends="$backends,onnxruntime";;
  *) echo "note: onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu); skipping ONNX Runtime CUDA";;
esac
if [ "$have_trt" = 1 ]; then
  backends="$backends,tensorrt"
  case "$providers" in *TensorrtExecutionProvider*) backends="$backends,onnxruntime-trt";; esac
  for m in $MODELS; do   # engines are built here, on the GPU that runs them, from the existing ONNX files
    for p in fp32 fp16; do
      f="$ENGINES/$m/$m.$p.onnx"
      [ -f "$f" ] && { $LUNGEDGE engine build "$f" --max-batch 32 --opt-batch 8 --out "$ENGINES" \
        || echo "note: engine build of $f failed (see above)"; }
    done
  done
fi
echo "backends: $backends"

for m in $MODELS; do
  echo "== $m: eval"
  $LUNGEDGE eval "$m" --device cuda --backend "$backends" --precision fp32,fp16 --runs "$RUNS" \
    --engines "$ENGINES" --out "$OUT" $EVAL_ARGS || echo "note: eval of $m failed"
  echo "== $m: bench"
  $LUNGEDGE bench "$m" --device cuda --backend "$backends" --precision fp32,fp16 --batch-sizes "$BATCH" \
    --warmup 10 --seconds 2 --runs "$RUNS" --engines "$ENGINES" --out "$OUT" || echo "note: bench of $m failed"
done
echo "results in $OUT; merge with: $LUNGEDGE report --results results --out reports"
