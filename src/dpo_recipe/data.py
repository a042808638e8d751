"""Preference pairs sampled into train/val/test splits deterministically from the seed, then tokenized exactly as
TRL 1.16's DPOTrainer tokenizes them (`encode_pairs`) and truncated the recipe's way (`truncate_pair`).

Rows are read and validated by `dpo_recipe.sources`. Nothing is lost silently: every truncated pair is counted by
kind in the run's `DataReport`, which the trainer prints and writes to the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ALL_PAIRS, ConfigError, DataConfig, MixtureSource, RecipeConfig, mixture_format_conflict
from .rundir import DATA_INDICES_FILE, DATA_REPORT_FILE
from .sources import (
    SPLITS,
    TOKENIZATION_NOTES,
    DataError,
    DataReport,
    Messages,
    PreferencePair,
    UnknownSplit,
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
    # Every usable pair read (each train source's, then a test and a validation source's), in source order.
    all: list[PreferencePair] = field(default_factory=list)

    def indices(self) -> dict[str, Any]:
        """data_indices.json: each split's rows (line numbers, or row indices of a table) and, pair by pair, the
        source each came from, as a position in `sources`."""
        sources = list(dict.fromkeys(pair.source for split in SPLITS for pair in getattr(self, split)))
        position = {source: i for i, source in enumerate(sources)}
        rows = {split: [pair.index for pair in getattr(self, split)] for split in SPLITS}
        of_pairs = {split: [position[pair.source] for pair in getattr(self, split)] for split in SPLITS}
        return rows | {"sources": sources, "pair_sources": of_pairs}


def recorded_pairs(indices: dict[str, Any], split: str) -> list:
    """A split's pairs in data_indices.json as (source, row); rows alone in a file written before sources were."""
    rows = indices.get(split) or []
    if "pair_sources" not in indices:
        return rows
    return [(indices["sources"][source], row) for source, row in zip(indices["pair_sources"][split], rows)]


def _read(source: str, split: str | None, config: DataConfig, report: DataReport, config_file: str, key: str):
    """read_pairs, with a split the dataset lacks named by the config key that asked for it."""
    try:
        return read_pairs(source, split, config, report)
    except UnknownSplit as error:
        raise DataError(
            f"{config_file}: {key} {error.split!r} is not a split of dataset {error.dataset} (its splits: "
            f"{', '.join(error.splits)})"
        ) from None


def _train_sources(config: DataConfig) -> list[tuple[str, MixtureSource]]:
    """(config key, entry) of each train + val source: the mixture's, or data.source as a mixture of one."""
    if config.mixture is not None:
        return [(f"data.mixture[{i}]", entry) for i, entry in enumerate(config.mixture)]
    return [("data", MixtureSource(
        source=config.source, subset=config.subset, config_name=config.config_name, split=config.train_split,
        format=config.format, num_pairs=config.num_pairs,
    ))]  # fmt: skip


def _pair_count(key: str, entry: MixtureSource, available: int, carved: int | str, source: str, config_file: str) -> int:
    """How many of a source's `available` usable pairs go to train + val; `carved` test pairs come from it too."""
    if entry.fraction is not None:
        count = round(entry.fraction * available)
        if count < 1:
            raise DataError(
                f"{config_file}: {key}.fraction {entry.fraction} of the {available} usable pairs of {source} is no pair"
            )
        return count
    reserved = carved if isinstance(carved, int) else 0
    count = available - reserved if entry.num_pairs == ALL_PAIRS else entry.num_pairs
    if count + reserved > available:
        what = f"{key}.num_pairs" + (" + data.num_test_pairs" if reserved else "")
        raise DataError(f"{config_file}: {what} = {count + reserved} but {source} has only {available} usable pairs")
    return count


def load_text_splits(config: DataConfig, seed: int, report: DataReport, config_file: str = "config") -> TextSplits:
    """Sample train/val/test pairs deterministically from the seed.

    Train + val come from data.source (or each source of data.mixture, shuffled together); validation is
    data.val_fraction of them, unless data.val_split / data.val_source give it a source of its own (all its pairs).
    Test pairs come from data.test_source or the dataset's test split, or are carved from a file source.
    """
    rng = random.Random(seed)
    mixture = config.mixture is not None
    # A hub dataset (or a directory laid out like one) has a test split; a file's test pairs are carved from it.
    carve_test = not mixture and config.test_source is None and source_kind(config.source) != "dataset"
    carved = config.num_test_pairs if carve_test else 0
    train_val, test, pools, formats = [], [], [], []
    for key, entry in _train_sources(config):
        if entry.config_name is not None and source_kind(entry.source) != "dataset":
            raise ConfigError(
                f"{key}.config_name {entry.config_name!r} names a configuration of a hub dataset (or of "
                f"a directory laid out like one), but {key}.source {entry.source!r} is not one"
            )
        read_as = dataclasses.replace(
            config, source=entry.source, subset=entry.subset, config_name=entry.config_name,
            format=entry.format or config.format, num_pairs=entry.num_pairs, num_test_pairs=carved, mixture=None,
        )  # fmt: skip
        pool = _read(entry.source, entry.split, read_as, report, config_file, f"{key}.split" if mixture else "data.train_split")
        name = pool[0].source
        formats.append((entry.source, report.formats[name]))
        conflict = mixture_format_conflict(formats)
        if conflict:
            raise DataError(f"{config_file}: {conflict}")
        if carved == ALL_PAIRS and entry.num_pairs == ALL_PAIRS:
            raise DataError(
                f"{config_file}: data.num_pairs and data.num_test_pairs are both `all`, but the test pairs of a file are "
                f"carved from data.source: give one of them a number, or name a data.test_source"
            )
        count = _pair_count(key, entry, len(pool), carved, name, config_file)
        num_test = len(pool) - count if carved == ALL_PAIRS else carved
        chosen = rng.sample(range(len(pool)), count + num_test)
        train_val += [pool[i] for i in chosen[:count]]
        test += [pool[i] for i in chosen[count:]]
        how = f"{key}.fraction {entry.fraction}" if entry.fraction is not None else f"{key}.num_pairs {entry.num_pairs}"
        carving = f", data.num_test_pairs {config.num_test_pairs} carved from it" if carve_test and num_test else ""
        report.selection[name] = f"{count + num_test} of its {len(pool)} usable pairs: {how}{carving}"
        pools += pool
    if config.num_test_pairs != 0 and not carve_test:
        test = _read_test_pairs(config, rng, report, config_file, pools)
    if mixture:
        rng.shuffle(train_val)
    val = _read_validation_pairs(config, report, config_file, pools)
    if val is None:
        num_val = max(1, round(len(train_val) * config.val_fraction))
        if num_val >= len(train_val):
            raise DataError(
                f"{config_file}: data.val_fraction {config.val_fraction} leaves no training pairs out of the "
                f"{len(train_val)} train + val pairs"
            )
        val, train_val = train_val[:num_val], train_val[num_val:]
    splits = TextSplits(train=train_val, val=val, test=test, all=pools)
    for name in report.selection:  # in the order the sources were read
        report.pairs_by_source.setdefault(name, dict.fromkeys(SPLITS, 0))
    for split in SPLITS:
        for pair in getattr(splits, split):
            counts = report.pairs_by_source.setdefault(pair.source, dict.fromkeys(SPLITS, 0))
            counts[split] += 1
    return splits


def _read_test_pairs(config: DataConfig, rng: random.Random, report: DataReport, config_file: str, pools: list) -> list:
    """`num_test_pairs` sampled from data.test_source, or from data.source's test split; none where there is neither."""
    source = config.test_source or (None if config.mixture is not None else config.source)
    no_split = config.test_split is None and source is not None and source_kind(source) == "dataset"
    if source is None or no_split:
        if config.num_test_pairs != ALL_PAIRS:
            missing = "data.test_split" if source else "data.test_source (a mixture's test pairs come from a source of their own)"
            raise DataError(
                f"{config_file}: data.num_test_pairs = {config.num_test_pairs} but there is no test split: set "
                f"{missing}, or data.num_test_pairs: 0"
            )
        return []
    test_pool = _read(source, config.test_split, config, report, config_file, "data.test_split")
    count = len(test_pool) if config.num_test_pairs == ALL_PAIRS else config.num_test_pairs
    if count > len(test_pool):
        raise DataError(
            f"{config_file}: data.num_test_pairs = {count} but the test source has only {len(test_pool)} usable pairs"
        )
    test = [test_pool[i] for i in rng.sample(range(len(test_pool)), count)]
    how = f"data.num_test_pairs {config.num_test_pairs}"
    report.selection[test_pool[0].source] = f"{count} of its {len(test_pool)} usable pairs: {how}"
    pools += test_pool
    return test


def _read_validation_pairs(config: DataConfig, report: DataReport, config_file: str, pools: list) -> list | None:
    """Every usable pair of data.val_source or data.val_split; None when validation is carved from train + val."""
    if config.val_source is None and config.val_split is None:
        return None
    source = config.val_source or config.source
    if source_kind(source) == "dataset" and config.val_split is None:
        raise DataError(f"{config_file}: data.val_source {source!r} is a dataset: name its split in data.val_split")
    if config.val_source is None and source_kind(source) != "dataset":
        raise DataError(
            f"{config_file}: data.val_split names a split of a dataset, but data.source {source!r} is a file: give "
            f"the validation file as data.val_source"
        )
    key = "data.val_split" if config.val_split is not None else "data.val_source"
    val = _read(source, config.val_split, config, report, config_file, key)
    report.selection[val[0].source] = f"all {len(val)} usable pairs: {key}"
    pools += val
    return val


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
