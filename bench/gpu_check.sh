#!/usr/bin/env bash
# GPU check of the trainer, for a lent H100/H200: under 8 minutes, nothing from the network.
#
#   OUT=/some/dir bash bench/gpu_check.sh        (run from the repository root)
#
# Writes $OUT/bench.json (+ bench.txt: the bench tables, with 1/2/4/8 concurrent trials) and
# $OUT/accuracy.txt (pretrain 6 epochs, then BNEW and STE 6 epochs each, on the CIFAR-10 JPEGs).
#
# Needs torch + torchvision (the GPU image has them) and pydantic, pyyaml, rich. If pydantic is
# missing, they are installed offline from the wheel directory $BNEW_WHEELS. Prepare it on a
# machine with network access, for the GPU image's Python (3.12 here; match --python-version):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d wheels pydantic pydantic-core annotated-types typing-inspection typing-extensions \
#       pyyaml rich markdown-it-py mdurl pygments
# and carry `wheels` with the run (do not commit it). Data: $BNEW_BENCH_DATA (an ImageFolder
# tree) or the tarball $BNEW_DATA_TAR (default shared/data/cifar10-jpeg.tar.gz), unpacked to /tmp.
set -euo pipefail
OUT=${OUT:-gpu-check-out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/log.txt"; }

if ! "$PYTHON" -c "import pydantic, yaml, rich" 2>/dev/null; then
    if [ -z "${BNEW_WHEELS:-}" ]; then
        log "pydantic/pyyaml/rich missing and BNEW_WHEELS unset (see the header of this script)"; exit 2
    fi
    log "installing pydantic, pyyaml, rich from $BNEW_WHEELS (offline)"
    "$PYTHON" -m pip install --quiet --no-index --find-links "$BNEW_WHEELS" pydantic pyyaml rich
fi

DATA=${BNEW_BENCH_DATA:-}
if [ -z "$DATA" ]; then
    DATA=/tmp/cifar
    if [ ! -d "$DATA/train" ]; then
        TAR=${BNEW_DATA_TAR:-shared/data/cifar10-jpeg.tar.gz}
        log "unpacking $TAR"
        mkdir -p "$DATA" && tar -xzf "$TAR" -C "$DATA"
    fi
fi
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,mig.mode.current --format=csv >> "$OUT/log.txt" 2>&1 || true

# Full epochs: the fast trainer runs one in seconds on these GPUs. Each run trains 2 epochs and is
# timed on the second (the first carries torch.compile: about a minute cold, then the on-disk
# cache). Bounds: bench 330 s (the first load also decodes the JPEGs into the tensor cache, ~1 min),
# accuracy 100 s; with setup under 8 minutes.
log "bench (3 interleaved repeats, then 1/2/4/8 concurrent trials)"
timeout 330 "$PYTHON" -m bench --data "$DATA" --device cuda --repeats 3 --concurrent 1,2,4,8 \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || log "bench failed or timed out (exit ${PIPESTATUS[0]})"

log "accuracy (pretrain 6, BNEW and STE 6 epochs)"
timeout 100 "$PYTHON" -m bench.accuracy --data "$DATA" --device cuda --pretrain-epochs 6 --epochs 6 \
    --optimisers bnew,ste --out "$OUT/accuracy.txt" 2>&1 | tail -n 20 | tee -a "$OUT/log.txt" \
    || log "accuracy failed or timed out"
log "done"
