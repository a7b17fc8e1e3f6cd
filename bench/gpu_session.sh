#!/usr/bin/env bash
# Every GPU figure bench/RESULTS.md still lacks, in one run on a lent H100 (about 8 minutes).
# The device machine has torch, timm, pytorch-lightning, einops, pyarrow and scipy but no
# omegaconf: carry it as wheels. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
# then: device run with carry [".whl"] and command "bash bench/gpu_session.sh".
set -uo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# issue 6: clips/s and peak memory, modes (a)-(d), integrated_saycam's defaults (B=16 T=8 K=7 224 px)
timeout 420 python3 bench/throughput.py integrated_saycam --gpu 2>&1 | tee "$OUT/throughput.txt"
# issue 3: a real `slotsweep train` run of integrated_saycam's model, 200 steps, plain and optimized
timeout 150 python3 bench/train_speed.py integrated_saycam --steps 200 \
    model.encoder.backbone.weights=random 2>&1 | tail -20 | tee "$OUT/train_speed.txt"
