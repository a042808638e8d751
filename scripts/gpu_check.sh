#!/usr/bin/env bash
# GPU check, run once on an H100/H200 from the repository root: the study's own run, `configs/beta0.3.yaml` (beta 0.3,
# lr 1e-4, 5 epochs of 2700 train pairs + 300 validation pairs, max_length 256, batch 16), on a randomly initialised
# GPT-2 124M in bf16: this recipe's trainer with its GPU defaults (separate rows, exact widths, uncompiled, forward
# passes at batch 32: the plain path wherever no GPU measurement chose otherwise) against plain trl.DPOTrainer.
# Everything is inside each trainer's timed span: the reference pass, compilation, warm-up. Then the first 5 losses
# of both with grouping off, then ours compiled (`ours_compiled`: training.torch_compile=true), so the two rows set
# the compile default. GPU_CHECK_VARIANTS replaces that last list (space-separated NAME:KEY=VALUE[,KEY=VALUE]), e.g.
#   GPU_CHECK_VARIANTS="ours_compiled:torch_compile=true ours_buckets:length_buckets=5"
# Writes $OUT/gpu_<h100|h200>.md as it goes (a run cut short keeps what it measured) and prints the tables.
#
# The device lacks trl/datasets/dill/multiprocess, so their wheels travel in .whl/ (installed below, no index).
# Prepare them and the data on the machine you launch from, once (both folders are git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   mkdir -p .devdata && cp ../shared/data/hh-rlhf-harmless-base-1812.jsonl.gz .devdata/
# and carry both: run(command="bash scripts/gpu_check.sh", carry=[".whl", ".devdata"], timeout_s=560).
# The 3000 pairs are drawn from the file's 1812 usable ones in passes over seeded shuffles (every pair once, then
# 1188 of them a second time).
#
# Budget: planned to finish in under 8 minutes on an H100 (plain TRL alone took ~100 s for these 5 epochs at the
# 135.7 pairs/s measured on db79b60); GPU_CHECK_TIMEOUT (default 480 s) stops it, keeping the results written so far.
# Order: ours, plain TRL, the loss agreement, the variants (GPU_CHECK_VARIANTS="" runs none).
#
# CPU rehearsal (minutes, exit 0 expected): GPU_CHECK_SIZE=tiny bash scripts/gpu_check.sh
# It shrinks the run (GPU_CHECK_PAIRS, GPU_CHECK_EVAL_PAIRS, GPU_CHECK_EPOCHS, GPU_CHECK_STEPS) and gives ours the GPU
# path's layout on CPU (separate rows); the compiled variant compiles with inductor on the CPU (most of its time).
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import trl, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
started=$(date +%s)
DATA=${GPU_CHECK_DATA:-.devdata/hh-rlhf-harmless-base-1812.jsonl.gz}
SIZE=${GPU_CHECK_SIZE:-124m}
if [ "$SIZE" = tiny ]; then small=1; else small=0; fi
PAIRS=${GPU_CHECK_PAIRS:-$([ $small = 1 ] && echo 48 || echo 2700)}
EVAL_PAIRS=${GPU_CHECK_EVAL_PAIRS:-$([ $small = 1 ] && echo 16 || echo 300)}
EPOCHS=${GPU_CHECK_EPOCHS:-$([ $small = 1 ] && echo 1 || echo 5)}
AGREEMENT_STEPS=${GPU_CHECK_STEPS:-$([ $small = 1 ] && echo 2 || echo 5)}
TIMEOUT=${GPU_CHECK_TIMEOUT:-$([ $small = 1 ] && echo 1200 || echo 480)}
# Dense bf16 peak of an H100 SXM and of an H200 alike (an H100 PCIe is 756e12: scale the MFU column by 989/756).
PEAK_FLOPS=${GPU_CHECK_PEAK_FLOPS:-989e12}

device=$(python3 - <<'EOF'
import torch, transformers, trl, datasets, sys
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
      f"datasets {datasets.__version__}; {gpu}", file=sys.stderr, flush=True)
print(next((name for name in ("h100", "h200") if name in gpu.lower()), "cpu" if gpu == "no GPU" else "gpu"))
EOF
) || exit 1
RESULTS=${OUT:-/tmp}/gpu_$device.md
if [ -f "$DATA" ]; then data_args=(--data "$DATA"); else
  echo "WARNING: $DATA not found: synthetic pairs with hh-rlhf-like lengths instead" >&2; data_args=(--synthetic); fi
extra=()
for variant in ${GPU_CHECK_VARIANTS-ours_compiled:torch_compile=true}; do extra+=(--variant "$variant"); done
[ $small = 1 ] && extra+=(--profile-steps 2 --ours-set prompt_sharing=false)

timeout --signal=INT --kill-after=20 "$TIMEOUT" python3 scripts/bench.py --size "$SIZE" "${data_args[@]}" \
  --train-pairs "$PAIRS" --eval-pairs "$EVAL_PAIRS" --epochs "$EPOCHS" --beta 0.3 --learning-rate 1e-4 \
  --eval-batch-size 0 --baselines trl --repeats 1 --agreement-steps "$AGREEMENT_STEPS" --peak-flops "$PEAK_FLOPS" \
  "${extra[@]}" --output "$RESULTS"
status=$?
[ $status = 124 ] && echo "stopped after $TIMEOUT s (GPU_CHECK_TIMEOUT): $RESULTS holds the runs that finished" >&2
echo "results: $RESULTS; whole script wall time $(( $(date +%s) - started )) s (exit $status)"
exit $status
