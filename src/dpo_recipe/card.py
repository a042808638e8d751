"""The model card (README.md in the run directory): TRL's card, with a usage example in the format the run trained
on and its training procedure (model, data, loss, optimization, best epoch) read from the run directory.

TRL writes its card before every checkpoint save and knows neither of those: its Quick start passes chat messages
to any model (a text-format run's tokenizer may have no chat template at all) and its "Training procedure" is
empty. The trainer completes the card each time TRL writes it, and once more when training ends, when the last
epoch and the best one are known.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import RecipeConfig, describe_model
from .rundir import (
    BEST_LINK,
    DATA_REPORT_FILE,
    best_label,
    best_record,
    load_run_config,
    read_metrics,
    trained_format,
)
from .sources import CHAT_FORMATS

QUESTION = "How do I bake bread?"


def quick_start(model_path: str, data_format: str, lora_checkpoint: str | None = None) -> str:
    """A usage example that gives the model prompts shaped as in training."""
    merge = ""
    if lora_checkpoint is not None:
        merge = (f"This run's checkpoints hold a LoRA adapter. Fold it into its base model first:\n\n```bash\n"
                 f"python -m dpo_recipe merge --checkpoint {lora_checkpoint} --out {model_path}\n```\n\n")  # fmt: skip
    if data_format in CHAT_FORMATS:
        prompt = f'prompt = [{{"role": "user", "content": "{QUESTION}"}}]  # rendered with the chat template it trained with'
        answer = 'print(output["generated_text"])'
    elif data_format == "hh-rlhf":
        prompt = f'prompt = "\\n\\nHuman: {QUESTION}\\n\\nAssistant:"  # hh-rlhf turns, as it trained on (no chat template)'
        answer = 'print(output["generated_text"].split("\\n\\nHuman:")[0])  # it goes on to write the next human turn'
    else:
        prompt = f'prompt = "{QUESTION}"  # plain text, as it trained on (no chat template)'
        answer = 'print(output["generated_text"])'
    return (
        f"## Quick start\n\n{merge}```python\nfrom transformers import pipeline\n\n{prompt}\n"
        f'generator = pipeline("text-generation", model="{model_path}")\n'
        f"output = generator(prompt, max_new_tokens=128, return_full_text=False)[0]\n{answer}\n```\n\n"
        f"Or with the recipe, which shapes prompts the same way: `python -m dpo_recipe generate --checkpoint "
        f"{lora_checkpoint or model_path}` (samples beside the reference model's) and `python -m dpo_recipe rank "
        f"--checkpoint {lora_checkpoint or model_path} --prompt ... --response-a ... --response-b ...`.\n\n"
    )


def _model_line(config: RecipeConfig) -> str:
    model = config.model
    text = describe_model(model)
    if model.tokenizer:
        text += f"; tokenizer {model.tokenizer}"
    if model.lora is None:
        return text + "; every weight trained"
    lora = model.lora
    return text + f"; LoRA r={lora.r}, alpha {lora.alpha}, dropout {lora.dropout:g} on {', '.join(lora.target_modules)}"


def _metrics(values: dict) -> str:
    return f"loss {values['loss']:.4f}, accuracy {values['accuracy']:.3f}, reward margin {values['margin']:.3f}"


def training_procedure(run_dir: Path, config: RecipeConfig, data_format: str) -> str:
    """The run's recipe and results, as bullet points and a per-epoch table (markdown)."""
    data, loss, training = config.data, config.loss, config.training
    report = run_dir / DATA_REPORT_FILE
    pairs = json.loads(report.read_text()).get("pairs", {}) if report.is_file() else {}
    counts = " / ".join(f"{pairs[split]} {split}" for split in ("train", "val", "test") if split in pairs)
    source = data.describe()
    loss_text = f"{loss.type}, β {loss.beta:g}"
    if loss.label_smoothing:
        loss_text += f", label smoothing {loss.label_smoothing:g}"
    if loss.rpo_alpha:
        loss_text += f", RPO α {loss.rpo_alpha:g}"
    records = read_metrics(run_dir)
    epochs = training.num_epochs
    length = f"{training.max_steps} steps at most" if training.max_steps else f"{epochs} epoch{'s' * (epochs != 1)}"
    lines = [
        "### This run",
        "",
        f"- **Model**: {_model_line(config)}",
        f"- **Data**: {source}, read as `{data_format}`: {counts or 'pair counts not recorded'} pairs, at most "
        f"{data.max_length} tokens per prompt + response",
        f"- **Loss**: {loss_text}",
        f"- **Optimization**: learning rate {training.learning_rate:g} ({training.lr_scheduler} schedule, warmup "
        f"ratio {training.warmup_ratio:g}), effective batch {training.effective_batch_size}, {length} configured, "
        f"{len(records)} trained, seed {training.seed}",
    ]
    found = best_record(run_dir)
    if found is not None and "train" in found[1]:  # an epoch
        best, record = found
        lines.append(
            f"- **Best epoch**: {best['epoch']} (by {best['metric'].replace('_', ' ')}); validation "
            f"{_metrics(record['val'])}; training loss {record['train']['loss']:.4f}. `{BEST_LINK}` links "
            f"to its checkpoint."
        )
    elif found is not None:  # a step checkpoint, validated inside its epoch
        best, record = found
        lines.append(
            f"- **Best checkpoint**: {best_label(best)} (by {best['metric'].replace('_', ' ')}); validation "
            f"{_metrics(record['val'])}. `{BEST_LINK}` links to it."
        )
    if records:
        lines += ["", "| epoch | step | train loss | val loss | val accuracy | val margin |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {r['epoch']} | {r['step']} | {r['train']['loss']:.4f} | {r['val'].get('loss', float('nan')):.4f} | "
            f"{r['val'].get('accuracy', float('nan')):.3f} | {r['val'].get('margin', float('nan')):.3f} |"
            for r in records
        ]
    return "\n".join(lines) + "\n\n"


def complete_model_card(text: str, run_dir: Path) -> str:
    """TRL's card with the recipe's Quick start and training procedure; the rest (metadata, citations) stays TRL's."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    data_format = trained_format(run_dir, config.data)
    best = str(run_dir / BEST_LINK)
    usage = quick_start(f"{run_dir}-merged", data_format, best) if config.model.lora is not None else quick_start(best, data_format)
    # A local or locally built model has no hub id: TRL's card would name "[None](https://huggingface.co/None)".
    text = text.replace("a fine-tuned version of [None](https://huggingface.co/None)",
                        f"a fine-tuned version of {describe_model(config.model)}")  # fmt: skip
    text = re.sub(r"## Quick start\n.*?(?=## Training procedure)", lambda _: usage, text, count=1, flags=re.DOTALL)
    procedure = training_procedure(run_dir, config, data_format)
    text = re.sub(r"(?=### Framework versions)", lambda _: procedure, text, count=1)
    return re.sub(r"\n(?:[ \t]*\n){2,}", "\n\n", text)  # the blank lines TRL's empty badge lines leave
