"""`show-data`: what the model sees. A split's pairs after rendering, tokenization and truncation, read through the
same code as training (`data.load_run_data`, `data.tokenize_pairs`), with the tokenizer and data only: no model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import RecipeConfig
from .data import encode_pairs, load_run_data, tokenize_pairs


def _visible(text: str, cut_before: bool = False, cut_after: bool = False) -> str:
    """Text between « and », each line break shown as \\n, so spaces at either end and every newline can be seen;
    … where truncation cut."""
    return "«" + "…" * cut_before + text.replace("\n", "\\n\n") + "…" * cut_after + "»"


def _indented(text: str, indent: str = "    ") -> str:
    return "\n".join(indent + line for line in text.split("\n"))


def _after(tokenizer, prompt_ids: list[int], response_ids: list[int]) -> str:
    """A response's text as it reads after its prompt: a decoder may drop a leading space of text decoded alone."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    whole = tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)
    return whole[len(prompt) :] if whole.startswith(prompt) else tokenizer.decode(response_ids, skip_special_tokens=False)


def _cut(kept: int, whole: int, end: str) -> str:
    return f" (truncation cut its {end} {whole - kept} of {whole})" if kept < whole else ""


def describe_pair(tokenizer, number: str, where: str, ids: tuple, untruncated: tuple) -> str:
    prompt_ids, chosen_ids, rejected_ids = ids
    lines = [f"pair {number}: {where}", f"  prompt   {len(prompt_ids)} tokens{_cut(len(prompt_ids), len(untruncated[0]), 'first')}"]
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    lines.append(_indented(_visible(prompt, cut_before=len(prompt_ids) < len(untruncated[0]))))
    for name, response_ids, whole in (("chosen", chosen_ids, untruncated[1]), ("rejected", rejected_ids, untruncated[2])):
        lines.append(f"  {name:<8} {len(response_ids)} tokens{_cut(len(response_ids), len(whole), 'last')}")
        lines.append(_indented(_visible(_after(tokenizer, prompt_ids, response_ids), cut_after=len(response_ids) < len(whole))))
    return "\n".join(lines)


def show_data(config: RecipeConfig, split: str = "all", count: int = 3, json_file: Path | None = None) -> list[str]:
    """The data report and the split's first `count` pairs, decoded with special tokens visible, in lines to print;
    with `json_file`, every pair of the split written there with the token ids training uses.

    `split` is train, val or test as training samples them, or `all`: every usable pair, in source order.
    """
    tokenizer, splits, report = load_run_data(config)
    pairs = getattr(splits, split)
    dataset = tokenize_pairs(pairs, tokenizer, config.data, split, report)
    columns = [dataset[name] for name in ("prompt_ids", "chosen_ids", "rejected_ids")]
    lines = report.summary_lines()
    shown = pairs[:count]
    untruncated, _ = encode_pairs(shown, tokenizer, config.data, split)  # only to say where truncation cut
    for number, (pair, whole) in enumerate(zip(shown, untruncated)):
        ids = tuple(column[number] for column in columns)
        lines += ["", describe_pair(tokenizer, f"{number + 1} of {len(pairs)} ({split})", f"{pair.source} row {pair.index}", ids, whole)]
    if json_file is not None:
        records = [
            {"source": pair.source, "row": pair.index, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
            for pair, prompt, chosen, rejected in zip(pairs, *columns)
        ]
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(records))
        lines += ["", f"wrote {json_file} ({len(records)} pairs)"]
    return lines
