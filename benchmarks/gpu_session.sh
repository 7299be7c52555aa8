#!/usr/bin/env bash
# Everything that needs a GPU, in one call (a lent GPU machine is billed by the minute): versions, the
# just-in-time build of the CUDA extension, the GPU tests, the roofline, the op-level and end-to-end
# benchmarks and the detector's AUROC on the GPU. Runs from a source tree (PYTHONPATH=src), as on a machine
# whose PyTorch cannot be replaced. Logs go to $OUT (default ./gpu-out); the tail of each part is printed.
#   bash benchmarks/gpu_session.sh [part ...]   parts: env build tests cli roofline sweep ncu ops cd auroc screen cpu spread
#     clustertests (issue 22's GPU tests alone) clusterops clusterroofline clustersweep poisoncam (default: env build tests roofline ops cd auroc clusterops
#     clusterroofline clustersweep poisoncam)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-gpu-out}")
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TROJANGUARD_PROGRESS=0
export TROJANGUARD_CACHE=${TROJANGUARD_CACHE:-/tmp/trojanguard-gpu-cache}
mkdir -p "$TROJANGUARD_CACHE"
[ -d .devcache ] && cp -rn .devcache/. "$TROJANGUARD_CACHE"/  # trained zoo models carried from a CPU machine
PY=${PYTHON:-python3}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(env build tests roofline ops cd auroc clusterops clusterroofline clustersweep poisoncam)

run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.log, print its tail
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - start)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}

for part in "${parts[@]}"; do
  case $part in
    env) run env 60 bash -c "nvidia-smi; which nvcc; nvcc --version | tail -2; $PY -c 'import torch, triton, onnxruntime as ort;
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"ort\", ort.__version__,
ort.get_available_providers()); print(torch.cuda.get_device_name(0))'" ;;
    build) run build 300 $PY -c "import time; t=time.time(); from trojanguard import _native
print(_native.build_info()); print('cuda reasons:', _native.cuda_reasons()); print(f'{time.time()-t:.0f} s')" ;;
    tests) run tests 420 $PY -m pytest -q -rs -p no:cacheprovider tests/ops/test_native.py tests/kernels/test_mask_step_kernel.py \
             tests/ops/test_mask_step.py tests/ops/test_cluster_sweep.py tests/detect/test_cognitive_distillation.py \
             tests/guard/test_guard.py tests/detect/test_poisoncam.py::test_an_encoder_on_a_gpu_runs_there_and_finds_what_the_cpu_finds ;;
    clustertests) run clustertests 240 $PY -m pytest -q -rs -p no:cacheprovider tests/ops/test_cluster_sweep.py \
                    tests/ops/test_native.py tests/kernels/test_mask_step_kernel.py \
                    tests/detect/test_poisoncam.py::test_an_encoder_on_a_gpu_runs_there_and_finds_what_the_cpu_finds ;;
    cli) run cli 360 env TROJANGUARD_NO_JIT=1 $PY -m pytest -q -rs -p no:cacheprovider -m "not slow" tests/bad_input \
           tests/cli tests/screening tests/guard/test_guard.py ;;  # --device auto = cuda
    roofline) run roofline 180 $PY benchmarks/roofline.py ;;
    sweep) TAIL=90 run sweep 240 $PY benchmarks/roofline.py --sweep --shapes 64x3x224x224 1024x3x32x32 --repeats 20 ;;
    ncu) run ncu 240 ncu --target-processes all -k regex:mask_step --launch-count 6 --metrics \
           gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__block_size \
           $PY benchmarks/roofline.py --shapes 64x3x224x224 --dtypes float32 --backends cuda triton --repeats 3 ;;
    ops) TAIL=14 run ops 180 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_mask_step.py --benchmark-only ;;
    cd) TAIL=24 run cd 300 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_cd.py --benchmark-only ;;
    clusterops) TAIL=30 run clusterops 240 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_cluster_sweep.py \
                  --benchmark-only ;;  # issue 22: the sweep's ops on every backend vs their references
    clusterroofline) TAIL=40 run clusterroofline 180 $PY benchmarks/roofline.py --cluster --repeats 20 ;;  # issue 22's ≥ 70 %
    clustersweep) TAIL=6 run clustersweep 420 bash -c "$PY benchmarks/sweep_end_to_end.py --arch small_cnn --size 32 --images 256 \
                    --repeats 5 --variants plain prepared no_graphs no_bf16 --results $OUT/sweep.jsonl
                  $PY benchmarks/sweep_end_to_end.py --arch torchvision:resnet18 --size 224 --images 32 --window 16 --stride 8 \
                    --variants prepared no_graphs no_bf16 --results $OUT/sweep.jsonl
                  $PY benchmarks/sweep_end_to_end.py --arch resnet18_cifar --size 32 --images 256 \
                    --variants prepared no_graphs no_bf16 --results $OUT/sweep.jsonl" ;;  # end to end vs eager
    poisoncam) TAIL=6 run poisoncam 300 $PY benchmarks/poisoncam_sweep_speed.py --arch torchvision:resnet18 --image-size 224 \
                 --images 300 --device cuda ;;  # PoisonCAM's fit before / after on a 224-px ResNet-18
    auroc) (cd benchmarks && TAIL=40 run auroc 420 $PY cd_effectiveness.py --device cuda --clean 0) ;;
    screen) TAIL=20 run screen 240 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_screen.py --benchmark-only ;;
    cpu) CUDA_VISIBLE_DEVICES= TAIL=22 run cpu 420 bash -c "lscpu | grep -E 'Model name|^CPU\(s\)'; lscpu | grep -o -E 'amx_bf16|avx512_bf16' | sort -u
      $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_cd.py --benchmark-only -k 'baseline or sdk-fp32 or sdk]'" ;;
    spread) SHARDS=${SHARDS:-$(( $(nproc) - 2 ))}; SPREAD_SECONDS=${SPREAD_SECONDS:-420}; TAIL=40 run spread $((SPREAD_SECONDS + 30)) bash -c "
      for k in \$(seq 0 $((SHARDS - 1))); do CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 timeout $SPREAD_SECONDS $PY benchmarks/bcu_seed_spread.py \
        --results $OUT/spread.json --shard \$k/$SHARDS --tag 'GPU host CPU, 1 thread' >$OUT/spread-\$k.log 2>&1 & done; wait"
      $PY benchmarks/bcu_seed_spread.py --results "$OUT/spread.json" --tag 'GPU host CPU, 1 thread' --report-only \
        > "$OUT/spread-table.md" 2>&1; cat "$OUT/spread-table.md" ;;  # BCU OOD seed spread on the host's CPU cores
    *) echo "unknown part $part" ;;
  esac
done
