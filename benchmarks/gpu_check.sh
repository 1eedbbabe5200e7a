#!/usr/bin/env bash
# The GPU check (issue 8) for a session that is lent a device machine: the tiny pipeline end to end on the GPU,
# the lean decoder against the HF forward on CUDA, the sharded (FSDP2) trainers against one process, and the
# test suite, in one prepared run.
#
#   bash benchmarks/gpu_check.sh prepare   # HERE, once: the wheels the device image lacks, into .whl/ (15 MB)
#   then the device tool's run with carry [".whl"], command "bash benchmarks/gpu_check.sh run", timeout_s 540
#
# Why wheels: the device image (.library/device/KINDS.md) has torch 2.11 (CUDA) and transformers 5.17, but textenv
# needs transformers >= 5.24 (the `cache=` forward argument) and gymnasium, stable-baselines3, tyro, vaderSentiment
# and datasets, and nothing can be fetched there. First run on a lent H200 in session 4.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(transformers==5.24.0 gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2 tyro==1.0.17
        docstring-parser==0.18.0 typeguard==4.6.1 vaderSentiment==3.3.2 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19)

case "${1:-}" in
prepare)
    grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls .whl
    ;;
run)
    out="${OUT:-/tmp/gpu_check}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    set +e  # from here a failing check is reported and the next one still runs
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 - <<'EOF' 2>&1 | tee "$out/decoder.txt"
# the lean GPT-2 decoder against the HF forward, on CUDA, fp32
import torch, transformers
from transformers import GPT2Config, GPT2LMHeadModel
from textenv.models.decoding import HFDecoder
from textenv.models.lean import LeanDecoder
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=256, n_layer=4, n_head=4, n_positions=256)).cuda().eval()
ids = torch.randint(2, 4096, (32, 16), device="cuda"); mask = torch.ones_like(ids); mask[:8, :5] = 0
lean, hf = LeanDecoder(model, 32, 64), HFDecoder(model, 32, 64)
with torch.inference_mode():
    worst = (lean.prefill(ids, mask) - hf.prefill(ids, mask)).abs().max().item()
    for _ in range(48):
        t = torch.randint(2, 4096, (32,), device="cuda")
        worst = max(worst, (lean.step(t) - hf.step(t)).abs().max().item())
print(f"max |lean - HF| logit difference over prefill + 48 steps: {worst:.2e}")
assert worst < 1e-3, worst
EOF
    # the main job's pipeline at the tiny preset: pretrain, SFT, collect, RM, PPO and eval pick cuda
    python3 -m agents.cli pipeline --preset tiny --out-dir /tmp/gpu_tiny 2>&1 | grep '\[pipeline\]' | tee "$out/pipeline_tiny.txt"
    cp /tmp/gpu_tiny/timings.json /tmp/gpu_tiny/report.md "$out/"
    # the main job itself (default preset), capped so the test run below still fits one lease
    timeout 200 python3 -m agents.cli pipeline --out-dir /tmp/gpu_default 2>&1 | grep '\[pipeline\]' \
        | tee "$out/pipeline_default.txt"
    # the sharded paths (--parallel fsdp, FSDP2): SFT, DPO, PPO, GRPO and RLOO launched as 2 processes against 1.
    # One GPU cannot hold two NCCL ranks, so the launched processes run on the host's CPUs (gloo) and the 1-process
    # references on the GPU (tests/test_distributed.py widens its tolerance to 1e-4 when CUDA is visible)
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py > "$out/distributed.txt" 2>&1
    echo "distributed exit $?"; tail -5 "$out/distributed.txt"
    # the test suite with CUDA visible: the trainers' default device is then cuda, so their CUDA paths run
    # (xdist is in the device image; on an H200 the suite took 214 s with -n 4, and got 37 tests into 150 s without)
    timeout 270 python3 -m pytest -q -p no:cacheprovider -n 4 --maxfail=10 --durations=5 tests > "$out/pytest.txt" 2>&1
    echo "pytest exit $?"; tail -30 "$out/pytest.txt"
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
