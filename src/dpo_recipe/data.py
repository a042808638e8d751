"""Preference pairs sampled into train/val/test splits deterministically from the seed, then tokenized exactly as
TRL 1.16's DPOTrainer tokenizes them (`encode_pairs`) and truncated the recipe's way (`truncate_pair`).

Rows are read and validated by `dpo_recipe.sources`. Nothing is lost silently: every truncated pair is counted by
kind in the run's `DataReport`, which the trainer prints and writes to the run directory.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, DataConfig, RecipeConfig
from .rundir import DATA_INDICES_FILE, DATA_REPORT_FILE
from .sources import (
    TOKENIZATION_NOTES,
    DataError,
    DataReport,
    Messages,
    PreferencePair,
    _blank,
    read_pairs,
    source_kind,
)

if TYPE_CHECKING:  # `datasets` takes seconds to import; a bad config or data file should fail before that
    from datasets import Dataset


@dataclass
class TextSplits:
    train: list[PreferencePair]
    val: list[PreferencePair]
    test: list[PreferencePair]
    # Every usable pair read (the source's, then a separate test source's), in source order, sampled or not.
    all: list[PreferencePair] = field(default_factory=list)

    def indices(self) -> dict[str, list[int]]:
        return {name: [pair.index for pair in getattr(self, name)] for name in ("train", "val", "test")}


def load_text_splits(config: DataConfig, seed: int, report: DataReport, config_file: str = "config") -> TextSplits:
    """Sample train/val/test pairs deterministically from the seed."""
    if config.config_name is not None and source_kind(config.source) != "dataset":
        raise ConfigError(
            f"data.config_name {config.config_name!r} names a configuration of a hub dataset (or of a directory laid "
            f"out like one), but data.source {config.source!r} is not one"
        )
    rng = random.Random(seed)
    pool = read_pairs(config.source, config.train_split, config, report)
    # A hub dataset (or a directory laid out like one) has a test split; a file's test pairs are carved from it.
    separate_test = config.test_source is not None or source_kind(config.source) == "dataset"
    needed = config.num_pairs + (0 if separate_test else config.num_test_pairs)
    if needed > len(pool):
        what = "data.num_pairs" if separate_test else "data.num_pairs + data.num_test_pairs"
        raise DataError(f"{config_file}: {what} = {needed} but {config.source} has only {len(pool)} usable pairs")
    chosen = rng.sample(range(len(pool)), needed)
    if separate_test:
        test_pool = read_pairs(config.test_source or config.source, config.test_split, config, report)
        if config.num_test_pairs > len(test_pool):
            raise DataError(
                f"{config_file}: data.num_test_pairs = {config.num_test_pairs} but the test source has only "
                f"{len(test_pool)} usable pairs"
            )
        test = [test_pool[i] for i in rng.sample(range(len(test_pool)), config.num_test_pairs)]
    else:
        test_pool, test = [], [pool[i] for i in chosen[config.num_pairs :]]
    train_val = [pool[i] for i in chosen[: config.num_pairs]]
    num_val = max(1, round(config.num_pairs * config.val_fraction))
    return TextSplits(train=train_val[num_val:], val=train_val[:num_val], test=test, all=pool + test_pool)


def truncate_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int, min_prompt_tokens: int,
    keep_first: int = 0,
) -> tuple[list[int], list[int], list[int], dict[str, bool]]:
    """Fit prompt+response into max_length for both responses without dropping the pair.

    The responses are what DPO learns from, so they stay whole while they fit: the prompt loses its oldest tokens
    first (down to its last `min_prompt_tokens`), and only a response longer than what is then left is cut from
    the right. The prompt's first `keep_first` tokens (a BOS) survive the cut: a model pretrained with a BOS has
    never seen a sequence without one.
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    kinds = {"prompt_cut_left": False, "response_cut_right": False}
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, chosen_ids, rejected_ids, kinds
    keep = max(max_length - longest, min(len(prompt_ids), min_prompt_tokens))
    if keep < len(prompt_ids):
        head = prompt_ids[: min(keep_first, keep)]
        prompt_ids = head + prompt_ids[len(prompt_ids) - (keep - len(head)) :]
        kinds["prompt_cut_left"] = True
    room = max_length - len(prompt_ids)
    if longest > room:
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        kinds["response_cut_right"] = True
    return prompt_ids, chosen_ids, rejected_ids, kinds


def use_chat_template(tokenizer, config: DataConfig, what: str) -> None:
    """Give the tokenizer `data.chat_template` (a Jinja template, or a file holding one), or check it has its own.

    The tokenizer is saved with every checkpoint, so evaluation renders messages with the template training used.
    """
    template = config.chat_template
    if template is not None:
        tokenizer.chat_template = template if "{" in template else Path(template).read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{what} are chat messages but the tokenizer has no chat template: set data.chat_template to a Jinja "
            f"template or a file holding one"
        )


def _where(pair: PreferencePair, split: str) -> str:
    """A pair as error messages name it: its source and line (or row), else its split and index."""
    return f"{pair.source}:{pair.index}" if pair.source else f"{split} pair {pair.index}"


def _chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool = False, **template_kwargs) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True, **template_kwargs
    )["input_ids"]


def encode_pairs(
    pairs: list[PreferencePair], tokenizer, config: DataConfig, split: str
) -> tuple[list[tuple[list[int], list[int], list[int]]], dict[str, int]]:
    """(prompt_ids, chosen_ids, rejected_ids) per pair, before truncation, exactly as TRL 1.16's DPOTrainer tokenizes
    them, and counts of TOKENIZATION_NOTES.

    TRL tokenizes the prompt alone and prompt + response whole, and a response is what follows the tokens the prompt
    shares with both. Text: with the tokenizer's special tokens (a BOS where the tokenizer puts one), each response
    ending with the end-of-sequence text unless it already does; so the boundary is tokenized as the whole text is
    (a prompt ending in a space, a response continuing the prompt's last word). Messages: the prompt rendered with
    the generation prompt, prompt + response without, both with the row's `tools` and `chat_template_kwargs`.
    A prompt whose last tokens differ once a response follows loses them to the responses, as in TRL: counted.
    """
    from trl.data_utils import common_prefix_length

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not eos and any(_blank(pair.chosen) or _blank(pair.rejected) for pair in pairs):
        empty = next(pair for pair in pairs if _blank(pair.chosen) or _blank(pair.rejected))
        raise DataError(f"{_where(empty, split)}: a response is empty and the tokenizer has no end-of-sequence token to score it")
    notes = dict.fromkeys(TOKENIZATION_NOTES, 0)
    texts = [pair for pair in pairs if isinstance(pair.prompt, str)]
    eos_text = tokenizer.eos_token

    def with_eos(response: str) -> str:
        if eos_text is None:
            return response
        notes["eos_text_in_response"] += response.endswith(eos_text)
        return response if response.endswith(eos_text) else response + eos_text

    def encode(parts: list[str]) -> list[list[int]]:
        return tokenizer(parts)["input_ids"] if parts else []

    encoded_texts = iter(zip(
        encode([p.prompt for p in texts]),
        encode([p.prompt + with_eos(p.chosen) for p in texts]),
        encode([p.prompt + with_eos(p.rejected) for p in texts]),
    ))  # fmt: skip
    if len(texts) < len(pairs):
        use_chat_template(tokenizer, config, f"{split} pairs")
    encoded = []
    for pair in pairs:
        if isinstance(pair.prompt, str):
            prompt_ids, *full = next(encoded_texts)
        else:
            kwargs = pair.template_kwargs
            prompt_ids = _chat_ids(tokenizer, pair.prompt, add_generation_prompt=True, **kwargs)
            full = [_chat_ids(tokenizer, pair.prompt + response, **kwargs) for response in (pair.chosen, pair.rejected)]
        shared = min(common_prefix_length(prompt_ids, ids) for ids in full)
        if shared == 0:
            raise DataError(
                f"{_where(pair, split)}: the prompt and prompt + response share no first token (the response merges "
                f"with the prompt's only word, or the chat template renders them apart); end the prompt on a token boundary"
            )
        notes["prompt_end_left_out"] += shared < len(prompt_ids)
        encoded.append((prompt_ids[:shared], *(ids[shared:] or eos for ids in full)))
    return encoded, notes


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer, config: DataConfig, split: str, report: DataReport
) -> Dataset:
    """Tokenize every pair as TRL does (`encode_pairs`), so both responses share the exact prompt tokens, and truncate."""
    from datasets import Dataset

    encoded, notes = encode_pairs(pairs, tokenizer, config, split)
    columns: dict[str, list] = defaultdict(list)
    counts = {"prompt_cut_left": 0, "response_cut_right": 0}
    bos = tokenizer.bos_token_id
    for pair, (prompt_ids, chosen_ids, rejected_ids) in zip(pairs, encoded):
        prompt_ids, chosen_ids, rejected_ids, kinds = truncate_pair(
            prompt_ids, chosen_ids, rejected_ids, config.max_length, config.min_prompt_tokens,
            keep_first=int(bos is not None and prompt_ids[:1] == [bos]),
        )
        for kind, happened in kinds.items():
            counts[kind] += happened
        columns["source_index"].append(pair.index)
        columns["prompt_ids"].append(prompt_ids)
        columns["chosen_ids"].append(chosen_ids)
        columns["rejected_ids"].append(rejected_ids)
        # Length of the shared-prompt row [prompt, chosen, rejected]: what a batch pads to.
        columns["length"].append(len(prompt_ids) + len(chosen_ids) + len(rejected_ids))
    report.truncated[split] = counts
    report.tokenization[split] = {note: count for note, count in notes.items() if count}
    report.pairs[split] = len(pairs)
    return Dataset.from_dict(dict(columns))


@dataclass
class PreparedData:
    train: Dataset
    val: Dataset
    test: Dataset
    report: DataReport
    indices: dict[str, list[int]]

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / DATA_REPORT_FILE).write_text(json.dumps(self.report.to_dict(), indent=2))
        (run_dir / DATA_INDICES_FILE).write_text(json.dumps(self.indices))


def prepare_data(splits: TextSplits, tokenizer, config: DataConfig, report: DataReport) -> PreparedData:
    return PreparedData(
        train=tokenize_pairs(splits.train, tokenizer, config, "train", report),
        val=tokenize_pairs(splits.val, tokenizer, config, "val", report),
        test=tokenize_pairs(splits.test, tokenizer, config, "test", report),
        report=report,
        indices=splits.indices(),
    )


def load_run_data(
    config: RecipeConfig, tokenizer_source: str | None = None, tokenizer_first=contextlib.nullcontext
) -> tuple[Any, TextSplits, DataReport]:
    """A run's tokenizer and text splits, read as training reads them (`show-data` shows exactly these).

    `tokenizer_source` (a checkpoint) wins over the config; `tokenizer_first` is entered around loading the
    tokenizer (distributed training: the main process trains a local BPE first, the others read it).
    """
    from .models import load_tokenizer

    report = DataReport()
    splits = load_text_splits(config.data, config.training.seed, report, config.source_file)
    training_texts = [text for pair in splits.train for text in pair.texts()]
    with tokenizer_first():
        tokenizer = load_tokenizer(
            config.model, training_texts, source=tokenizer_source, cache_dir=config.training.reference_cache_dir
        )
    return tokenizer, splits, report
