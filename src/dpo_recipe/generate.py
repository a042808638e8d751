"""Policy and reference samples side by side (markdown): for a run's test prompts, a dataset's, or your own, each shaped
as the model was trained (see `evaluate.RunScorer`), sampled with the same seed for both models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError
from .data import encode_pairs
from .evaluate import load_reference_model, rank_pair, read_prompts, scorer_for
from .sources import HUMAN_MARKER, DataError, DataReport


@dataclass
class SamplingSettings:
    num_prompts: int = 4
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0


def _sample(model, tokenizer, prompt_ids: list[int], settings: SamplingSettings, seed: int) -> str:
    from transformers import set_seed

    set_seed(seed)  # the same seed for policy and reference, so differences come from the weights
    input_ids = torch.tensor([prompt_ids], device=model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text = tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True)
    # A dialogue model goes on to write the next human turn; the answer ends where that begins.
    return text.split(HUMAN_MARKER)[0].strip()


def _transcript(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{message['role']}: {message['content']}" for message in messages)


def _cell(text: str) -> str:
    # An undertrained model emits control characters too; in a table cell they would break the row.
    text = "".join(c if c.isprintable() or c == "\n" else " " if c == "\t" else "\ufffd" for c in text)
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return escaped.replace("\n", "<br>") or "*(empty)*"


def write_generations(
    checkpoint: str | Path,
    settings: SamplingSettings | None = None,
    out: Path | None = None,
    reference: str | None = None,
    data_source: str | None = None,
    prompts_file: str | Path | None = None,
    data_format: str | None = None,
) -> Path:
    """Sample from the policy and the reference for the first test prompts (or those of `data_source`, or every prompt
    of `prompts_file`); write them side by side in markdown."""
    settings = settings or SamplingSettings()
    given = Path(checkpoint)
    scorer = scorer_for(given, reference, None, data_format)
    checkpoint = given.resolve()
    max_length = scorer.config.data.max_length
    if not 0 < settings.max_new_tokens < max_length:
        raise ConfigError(f"--max-new-tokens must be in [1, data.max_length={max_length}) (got {settings.max_new_tokens})")
    if settings.num_prompts < 1 or settings.temperature <= 0 or not 0 < settings.top_p <= 1:
        raise ConfigError(f"generate: need --num-prompts >= 1, --temperature > 0 and --top-p in (0, 1] (got {settings})")
    report = DataReport()
    if prompts_file is not None:  # prompts only: no dataset response to show beside the samples
        prompts = read_prompts(prompts_file)
        pairs = [rank_pair(i, {"prompt": p, "response_a": "", "response_b": ""}, scorer.data_format) for i, p in enumerate(prompts)]
    else:
        pairs = (scorer.read_pairs(data_source, report) if data_source else scorer.test_pairs(report))[: settings.num_prompts]
    source = f"prompts from {prompts_file}" if prompts_file else f"prompts from {data_source}" if data_source else "test prompts"
    if not pairs:
        raise DataError(f"{scorer.config_file}: the run has no test pairs to take prompts from")
    models = {
        f"policy ({checkpoint.name})": scorer.policy_model(checkpoint, fused_lm_head=False).to(scorer.device),
        "reference": load_reference_model(scorer.config, scorer.run_dir, scorer.tokenizer).to(scorer.device),
    }
    lines = [
        f"# Samples: {scorer.run_dir.name} / {checkpoint.name} vs. the reference",
        "",
        f"{len(pairs)} {source}; sampling with temperature {settings.temperature}, top-p {settings.top_p}, "
        f"at most {settings.max_new_tokens} new tokens, seed {settings.seed} (the same per prompt for both models). "
        f"Each answer is cut where the model starts a new '\\n\\nHuman:' turn. Long prompts keep their last "
        f"{max_length - settings.max_new_tokens} tokens.",
        "",
    ]
    for number, pair in enumerate(pairs, start=1):
        (prompt_ids, _, _), *_ = encode_pairs([pair], scorer.tokenizer, scorer.config.data, "generate")[0]
        prompt_ids = prompt_ids[-(max_length - settings.max_new_tokens) :]
        seed = settings.seed + number
        with torch.no_grad(), scorer.autocast():
            samples = {name: _sample(model, scorer.tokenizer, prompt_ids, settings, seed) for name, model in models.items()}
        columns, cells = list(models), [_cell(text) for text in samples.values()]
        if prompts_file is None:
            columns, cells = columns + ["dataset's chosen response"], cells + [_cell(pair.texts()[1].strip())]
        where = "line" if prompts_file else "row" if data_source else "test pair"
        lines += [
            f"## Prompt {number} ({where} {pair.index + 1 if prompts_file else pair.index})",
            "",
            "```text",
            pair.texts()[0].strip() if isinstance(pair.prompt, str) else _transcript(pair.prompt),
            "```",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            "| " + " | ".join(cells) + " |",
            "",
        ]
    out = out or scorer.run_dir / f"generations_{checkpoint.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
