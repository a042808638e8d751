"""Preference pairs sampled into train/val/test splits deterministically from the seed, then tokenized exactly as
TRL 1.16's DPOTrainer tokenizes them (`encode_pairs`) and truncated the recipe's way (`truncate_pair`).

Rows are read and validated by `dpo_recipe.sources`. Nothing is lost silently: every truncated pair is counted by
kind in the run's `DataReport`, which the trainer prints and writes to the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import multiprocessing
import os
import json
import random
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
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


# Pairs per batched tokenizer call, and per task of the process pool: a batch's token ids live as Python lists until
# they are truncated and stored as Arrow, so the batch bounds that memory (60k UltraFeedback-like pairs, ~2 GB whole).
ENCODE_BATCH = 1000
# `data.num_proc: null` uses up to this many processes, one per this many pairs (forking costs ~0.1 s each).
MAX_AUTO_PROCESSES = 8
PAIRS_PER_AUTO_PROCESS = 2 * ENCODE_BATCH


def _chat_ids(tokenizer, conversations: list[Messages], add_generation_prompt: bool, template_kwargs: dict) -> list[list[int]]:
    """Token ids of each conversation rendered with the chat template: one batched call, as fast tokenizers are
    several times faster on a batch than string by string (TRL renders and tokenizes the same way, one at a time)."""
    return tokenizer.apply_chat_template(
        conversations, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True, **template_kwargs
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
    eos_text = tokenizer.eos_token

    def with_eos(response: str) -> str:
        if eos_text is None:
            return response
        notes["eos_text_in_response"] += response.endswith(eos_text)
        return response if response.endswith(eos_text) else response + eos_text

    # Each pair's (prompt, prompt + chosen, prompt + rejected) ids, by pair position. Text in one batch; messages in
    # one batch per distinct `tools` / `chat_template_kwargs` (nearly always one: none).
    full_ids: list[tuple[list[int], ...]] = [()] * len(pairs)
    texts = [i for i, pair in enumerate(pairs) if isinstance(pair.prompt, str)]
    if texts:
        encoded = [
            tokenizer([pairs[i].prompt + with_eos(getattr(pairs[i], side)) if side else pairs[i].prompt for i in texts])["input_ids"]
            for side in ("", "chosen", "rejected")
        ]  # fmt: skip
        for i, *ids in zip(texts, *encoded):
            full_ids[i] = tuple(ids)
    if len(texts) < len(pairs):
        use_chat_template(tokenizer, config, f"{split} pairs")
        groups: dict[str, list[int]] = defaultdict(list)
        for i, pair in enumerate(pairs):
            if not isinstance(pair.prompt, str):
                groups[json.dumps(pair.template_kwargs, sort_keys=True, default=repr)].append(i)
        for members in groups.values():
            kwargs = pairs[members[0]].template_kwargs
            encoded = [_chat_ids(tokenizer, [pairs[i].prompt for i in members], True, kwargs)] + [
                _chat_ids(tokenizer, [pairs[i].prompt + getattr(pairs[i], side) for i in members], False, kwargs)
                for side in ("chosen", "rejected")
            ]  # fmt: skip
            for i, *ids in zip(members, *encoded):
                full_ids[i] = tuple(ids)
    result = []
    for pair, (prompt_ids, *full) in zip(pairs, full_ids):
        shared = min(common_prefix_length(prompt_ids, ids) for ids in full)
        if shared == 0:
            raise DataError(
                f"{_where(pair, split)}: the prompt and prompt + response share no first token (the response merges "
                f"with the prompt's only word, or the chat template renders them apart); end the prompt on a token boundary"
            )
        notes["prompt_end_left_out"] += shared < len(prompt_ids)
        result.append((prompt_ids[:shared], *(ids[shared:] or eos for ids in full)))
    return result, notes


@dataclass
class TokenizedChunk:
    """`tokenize_chunk`'s result: the pairs' columns as a Dataset, and their counts for the report."""

    dataset: Dataset
    truncated: dict[str, int]
    notes: dict[str, int]


def tokenize_chunk(pairs: list[PreferencePair], tokenizer, config: DataConfig, split: str) -> TokenizedChunk:
    """Encode (`encode_pairs`) and truncate (`truncate_pair`) some pairs of a split, in their order."""
    from datasets import Dataset

    encoded, notes = encode_pairs(pairs, tokenizer, config, split)
    columns: dict[str, list] = {name: [] for name in ("source_index", "prompt_ids", "chosen_ids", "rejected_ids", "length")}
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
    return TokenizedChunk(Dataset.from_dict(columns, features=tokenized_features()), counts, notes)


def tokenized_features():
    """The columns' types, the same for every chunk (an empty one too), so chunks concatenate."""
    from datasets import Features, List, Value

    ids = List(Value("int64"))
    return Features(source_index=Value("int64"), prompt_ids=ids, chosen_ids=ids, rejected_ids=ids, length=Value("int64"))


def _record_split(report: DataReport, split: str, pairs: int, chunks: list[TokenizedChunk]) -> Dataset:
    from datasets import concatenate_datasets

    report.truncated[split] = {kind: sum(chunk.truncated[kind] for chunk in chunks) for kind in chunks[0].truncated}
    notes = {note: sum(chunk.notes[note] for chunk in chunks) for note in TOKENIZATION_NOTES}
    report.tokenization[split] = {note: count for note, count in notes.items() if count}
    report.pairs[split] = pairs
    return chunks[0].dataset if len(chunks) == 1 else concatenate_datasets([chunk.dataset for chunk in chunks])


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer, config: DataConfig, split: str, report: DataReport
) -> Dataset:
    """Tokenize every pair as TRL does (`encode_pairs`), so both responses share the exact prompt tokens, and truncate."""
    chunks = [tokenize_chunk(pairs[start : start + ENCODE_BATCH], tokenizer, config, split)
              for start in range(0, max(len(pairs), 1), ENCODE_BATCH)]  # fmt: skip
    return _record_split(report, split, len(pairs), chunks)


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


def preparation_processes(config: DataConfig, pairs: int) -> int:
    """`data.num_proc`, or for null one process per PAIRS_PER_AUTO_PROCESS pairs, up to the usable cores (and 8)."""
    if config.num_proc is not None:
        return config.num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_PROCESSES, pairs // PAIRS_PER_AUTO_PROCESS))


# What forked workers tokenize: set before the pool forks, so children inherit it instead of receiving it pickled.
_FORKED_WORK: tuple[dict[str, list[PreferencePair]], Any, DataConfig] | None = None


def _tokenize_forked(split: str, start: int) -> TokenizedChunk:
    pairs, tokenizer, config = _FORKED_WORK
    return tokenize_chunk(pairs[split][start : start + ENCODE_BATCH], tokenizer, config, split)


def prepare_data(splits: TextSplits, tokenizer, config: DataConfig, report: DataReport) -> PreparedData:
    """Tokenize the three splits, in chunks of ENCODE_BATCH pairs, on `preparation_processes` processes.

    The chunks are the same on any number of processes and are put back in order, so the result is identical. The
    workers are forked (as `datasets.map(num_proc=...)` does): they inherit the pairs and tokenizer instead of
    importing and unpickling them. They tokenize single-threaded (TOKENIZERS_PARALLELISM=false while they live):
    processes, not the tokenizer's threads, then share the cores, and a tokenizer whose thread pool was already used
    in this process is not forked with it.
    """
    global _FORKED_WORK
    by_split = {name: getattr(splits, name) for name in ("train", "val", "test")}
    tasks = [(name, start) for name, pairs in by_split.items() for start in range(0, max(len(pairs), 1), ENCODE_BATCH)]
    processes = min(preparation_processes(config, sum(map(len, by_split.values()))), len(tasks))
    if any(not isinstance(pair.prompt, str) for pairs in by_split.values() for pair in pairs):
        use_chat_template(tokenizer, config, "the pairs")  # here, so the tokenizer saved with checkpoints has it too
    if processes <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        chunks = [tokenize_chunk(by_split[name][start : start + ENCODE_BATCH], tokenizer, config, name) for name, start in tasks]
    else:
        _FORKED_WORK, parallelism = (by_split, tokenizer, config), os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # The read pairs are millions of objects: frozen, a child's garbage collector neither walks them nor, by
        # touching them, copies their memory pages.
        gc.freeze()
        try:
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
                chunks = list(pool.map(_tokenize_forked, *zip(*tasks)))
        finally:
            gc.unfreeze()
            _FORKED_WORK = None
            if parallelism is None:
                os.environ.pop("TOKENIZERS_PARALLELISM")
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    datasets = {
        name: _record_split(report, name, len(by_split[name]), [chunk for (split, _), chunk in zip(tasks, chunks) if split == name])
        for name in by_split
    }  # fmt: skip
    return PreparedData(**datasets, report=report, indices=splits.indices())


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
