#!/usr/bin/env bash
# Serve the bundled model with TensorFlow on a GPU and measure it; every result goes under $OUT.
#
#   OUT=/some/folder bench/gpu.sh            # on a GPU machine: the aisight-gpu image, or any host
#                                            # where pip can install tensorflow[and-cuda]
#
# 1. set up: use the Python that already has TensorFlow with a GPU (the aisight-gpu image), else make
#    .venv-gpu from requirements.txt with tensorflow[and-cuda] instead of tensorflow-cpu;
# 2. check: TensorFlow's GPU paths (float32, XLA, bf16; TF-TRT where TensorRT is present) against the
#    CPU's answers (OpenVINO float32) on real photos, float32 within 1e-4 (bench/gpu_check.py);
# 3. model step: images/s by batch size for each path, and the best batch (bench/model_step.py);
# 4. serving: the app as `make run` starts it, on the GPU, at 8, 32 and 128 clients, for
#    AISIGHT_BATCH_MAX 8, 32 and the best batch (bench/serve.py), throughput and p50/p99;
# 5. summary.md: what ran, on which GPU, and every table.
# Exit status: 0 when everything ran and the float32 paths agree with the CPU; non-zero otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench-gpu-out}
MODEL=${MODEL:-models/2.0.0}
mkdir -p "$OUT"
log() { echo "[gpu.sh $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.md" >&2; }
: > "$OUT/summary.md"

has_tf_gpu() { "$1" -c 'import sys, tensorflow as tf; sys.exit(0 if tf.config.list_physical_devices("GPU") else 1)' 2>/dev/null; }
PY=${PY:-}
if [ -z "$PY" ]; then
  for cand in python3 .venv-gpu/bin/python; do
    if command -v "$cand" >/dev/null 2>&1 && has_tf_gpu "$cand"; then PY=$cand; break; fi
  done
fi
if [ -z "$PY" ]; then
  log "no Python with TensorFlow on a GPU here: making .venv-gpu (needs the package index)"
  tf_version=$(sed -n 's/^tensorflow-cpu==\([0-9][0-9.]*\).*$/\1/p' requirements.txt)
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -r <(grep -v '^tensorflow-cpu' requirements.txt) "tensorflow[and-cuda]==${tf_version}" \
    || { log "could not install TensorFlow for the GPU (no package index?): nothing measured"; exit 3; }
  PY=.venv-gpu/bin/python
fi
has_tf_gpu "$PY" || { log "TensorFlow ($PY) sees no GPU here: nothing measured"; exit 3; }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | sed 's/^/GPU: /' | tee -a "$OUT/summary.md"
"$PY" -c 'import tensorflow as tf; print("TensorFlow", tf.__version__)' | tee -a "$OUT/summary.md"
[ -f "$MODEL/model.xml" ] || "$PY" -m training export-openvino --model "$MODEL"  # the CPU reference's IR

log "1/3 answers: GPU paths against the CPU"
status=0
"$PY" bench/gpu_check.py --model "$MODEL" --out "$OUT" 2>&1 | tee -a "$OUT/summary.md" || status=1

log "2/3 model step by batch size"
"$PY" bench/model_step.py --model "$MODEL" --paths tf-float32,tf-bf16,xla --batches 1,8,16,32,64,128,256 \
  --seconds 3 --json "$OUT/model_step.json" 2>&1 | tee -a "$OUT/summary.md"
best=$("$PY" - "$OUT/model_step.json" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
best = {}
for res in results["paths"]:  # bench/model_step.py: per path, per batch the median seconds of one call
    for r in res["rows"]:
        ips = r["batch"] / r["median_s"]
        if not best or ips > best["ips"]:
            best = {"ips": ips, "batch": r["batch"], "path": res["path"]}
print(best.get("batch", 32))
EOF
)
log "best batch size for the model alone: $best"

log "3/3 serving on the GPU at 8, 32 and 128 clients"
for bm in $(printf '%s\n' 8 32 "$best" | sort -n | uniq); do
  "$PY" bench/serve.py --model "$MODEL" --backends tensorflow --precisions auto --no-baseline --sizes 400 \
    --levels 8,32,128 --requests 512 --workers 1 --threads 32 \
    --env AISIGHT_BATCH_MAX="$bm" --env AISIGHT_QUEUE_MAX=256 --env AISIGHT_BATCH_WAIT_MS=5 \
    --json "$OUT/serve-batch$bm.json" 2>&1 | tee -a "$OUT/summary.md" || status=1
done
log "done (status $status); files in $OUT"
exit $status
