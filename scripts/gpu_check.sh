#!/usr/bin/env bash
# GPU check, run once on an H100/H200 from the repository root: GPT-2 124M (random init), bf16, one epoch of 3000
# pairs at the study's settings (max_length 256, batch 16), this recipe's trainer against plain trl.DPOTrainer.
# The device lacks trl/datasets/dill/multiprocess, so their wheels travel in .whl/ (installed below, no index).
# Prepare them (and the data) on the machine you launch from, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   mkdir -p .devdata && cp ../shared/data/hh-rlhf-harmless-base-1812.jsonl.gz .devdata/   # both are git-ignored
# The data travels as .devdata/hh-rlhf-harmless-base-1812.jsonl.gz; 3000 pairs are drawn from its 1812 usable ones
# in passes over seeded shuffles (every pair once, then 1189 of them a second time).
# Shrink it for a CPU rehearsal: GPU_CHECK_SIZE=tiny GPU_CHECK_PAIRS=48 GPU_CHECK_EVAL_PAIRS=32 GPU_CHECK_STEPS=2.
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import trl, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
started=$(date +%s)
DATA=${GPU_CHECK_DATA:-.devdata/hh-rlhf-harmless-base-1812.jsonl.gz}
SIZE=${GPU_CHECK_SIZE:-124m}
PAIRS=${GPU_CHECK_PAIRS:-3000}
EVAL_PAIRS=${GPU_CHECK_EVAL_PAIRS:-320}
AGREEMENT_STEPS=${GPU_CHECK_STEPS:-5}
RESULTS=${OUT:-/tmp}/gpu_results.md
# Dense bf16 peak of an H100 SXM and of an H200 alike (an H100 PCIe is 756e12: scale the MFU column by 989/756).
PEAK_FLOPS=${GPU_CHECK_PEAK_FLOPS:-989e12}

python3 - <<'EOF' || exit 1
import torch, transformers, trl, datasets
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
      f"datasets {datasets.__version__}; {gpu}", flush=True)
EOF
if [ -f "$DATA" ]; then data_args=(--data "$DATA"); else
  echo "WARNING: $DATA not found: synthetic pairs with hh-rlhf-like lengths instead" >&2; data_args=(--synthetic); fi

python3 scripts/bench.py --size "$SIZE" "${data_args[@]}" --train-pairs "$PAIRS" --eval-pairs "$EVAL_PAIRS" \
  --epochs 1 --repeats 1 --agreement-steps "$AGREEMENT_STEPS" --peak-flops "$PEAK_FLOPS" --output "$RESULTS"
status=$?
echo "MFU = (6*N*training tokens + 2*N*reference-forward tokens) / time / $PEAK_FLOPS; N = parameters, tokens ="
echo "non-pad positions each trainer's passes process (ours: prompt once per pair; trl: reference every step)"
echo "results: $RESULTS; whole script wall time $(( $(date +%s) - started )) s (exit $status)"
exit $status
