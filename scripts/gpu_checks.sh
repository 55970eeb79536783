#!/usr/bin/env bash
# Everything that needs a GPU, in one run of about 8 minutes (at most 11.5, the stages' limits) on one H100/H200-class card:
#   1. the CUDA tests: the step never synchronizes with the host (set_sync_debug_mode("error")),
#      the fast kernels equal the reference kernel on CUDA, the whole step compiles to one graph;
#      kernel="triton" against the reference for every base x meta x granularity x variant, and its
#      step without a host sync (tests/metaopt/test_triton_kernel.py);
#   2. scripts/bench_step.py: optimizer-step time against fused AdamW: the triton and flat kernels with
#      either storage, scalar and blockwise, for four pairs, then the triton kernel on contiguous storage
#      for every pair (the goals: <= 1.3x fused AdamW for (AdamW, Lion) scalar, <= 1.5x for every pair);
#   3. scripts/bench_overhead.py: Table 1 on the paper's batch sizes, the triton kernel among the optimizers
#      (goals: CIFAR-10 ResNet-18 iteration overhead < 3%, ImageNet and TinyStories < 1%, no loss of largest
#      batch), largest batch by bisection within a memory cap (24 GiB; ImageNet 12 GiB), which keeps the
#      bisection's probes short.
# Each stage has its own time limit, and each script writes its tables as it goes, so a stage
# that runs out of time keeps what it measured and the next stage still runs.
#
#     bash scripts/gpu_checks.sh [OUT_DIR]        # default: results/performance
set -uo pipefail
out=${1:-results/performance}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
python=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) ==="
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start)) s ==="
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

stage "CUDA tests" 90 $python -m pytest -q -p no:cacheprovider -o addopts="" --timeout=80 --tb=short --show-capture=no \
    tests/metaopt/test_kernels.py tests/metaopt/test_performance.py -k "cuda"
stage "CUDA tests, triton kernel" 120 $python -m pytest -q -p no:cacheprovider -o addopts="" --timeout=110 --tb=short \
    --show-capture=no tests/metaopt/test_triton_kernel.py -k "cuda"

stage "step time, triton and flat" 100 $python scripts/bench_step.py --device cuda --kernels triton flat \
    --storages contiguous separate --pairs adamw/lion lion/lion adamw/adam sgdm/lion --out "$out/bench_step_cuda_triton"
stage "step time, every pair" 80 $python scripts/bench_step.py --device cuda --kernels triton --storages contiguous \
    --blocks scalar --out "$out/bench_step_cuda_triton_pairs"

stage "Table 1" 200 $python scripts/bench_overhead.py --device cuda --workloads cifar10_resnet18 tinystories_llama2c_15m \
    --memory-gib 24 --precision 0.02 --out "$out/bench_overhead_cuda"
# ImageNet's iterations are long: fewer optimizers, rounds and bisection steps to fit the lease
stage "Table 1, ImageNet" 100 $python scripts/bench_overhead.py --device cuda --workloads imagenet_resnet18 \
    --optimizers AdamW "MetaOptimize (AdamW, Lion)" "MetaOptimize (AdamW, Lion) triton" "MetaOptimize (Lion, Lion)" DoG Prodigy \
    --rounds 10 --memory-gib 12 --precision 0.05 --out "$out/bench_overhead_cuda_imagenet"
