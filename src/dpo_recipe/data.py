"""hh-rlhf preference data: read, validate, split into prompt/responses, sample, tokenize, truncate.

Nothing is lost silently: every dropped row is counted by reason (with its first line numbers) and every
truncated pair is counted by kind, in a `DataReport` that the trainer prints and writes to the run directory.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DataConfig

if TYPE_CHECKING:  # `datasets` takes seconds to import; a bad config or data file should fail before that
    from datasets import Dataset

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
SYNTHETIC_SOURCE = "synthetic"
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".json")
EXAMPLE_LINES_PER_REASON = 5

DROP_REASONS = {
    "invalid_utf8": "line is not valid UTF-8",
    "malformed_json": "line is not a JSON object",
    "missing_field": "'chosen' or 'rejected' is missing",
    "non_string_field": "'chosen' or 'rejected' is not a string",
    "empty_text": "'chosen' or 'rejected' is empty",
    "identical": "chosen equals rejected, or both responses are empty",
    "no_assistant_marker": "no '\\n\\nAssistant:' marker",
    "prompt_mismatch": "chosen and rejected have different prompts",
}
# Kept, but counted: a rater may prefer saying nothing (hh-rlhf harmless-base has such pairs). As in TRL, the empty
# response is scored as its end-of-sequence token alone.
EMPTY_RESPONSE_NOTE = "a response is empty; kept, scored as its end-of-sequence token alone"


class DataError(ValueError):
    """A data problem that stops the run, worded as one line naming the file (and line)."""


class BadRow(ValueError):
    def __init__(self, reason: str):
        super().__init__(DROP_REASONS[reason])
        self.reason = reason


@dataclass
class PreferencePair:
    index: int  # 1-based line number of a local file, 0-based row index of a hub split
    prompt: str
    chosen: str
    rejected: str


@dataclass
class DataReport:
    """What happened to every row: kept, dropped (by reason) or truncated (by kind)."""

    rows_read: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped_examples: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    truncated: dict[str, dict[str, int]] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)
    empty_response_kept: dict[str, int] = field(default_factory=dict)
    empty_response_examples: dict[str, list[int]] = field(default_factory=dict)

    def record_empty_response(self, source: str, index: int) -> None:
        self.empty_response_kept[source] = self.empty_response_kept.get(source, 0) + 1
        examples = self.empty_response_examples.setdefault(source, [])
        if len(examples) < EXAMPLE_LINES_PER_REASON:
            examples.append(index)

    def record_drop(self, source: str, reason: str, index: int) -> None:
        counts = self.dropped.setdefault(source, defaultdict(int))
        counts[reason] += 1
        examples = self.dropped_examples.setdefault(source, defaultdict(list))
        if len(examples[reason]) < EXAMPLE_LINES_PER_REASON:
            examples[reason].append(index)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__))

    def summary_lines(self) -> list[str]:
        lines = []
        for source, read in self.rows_read.items():
            dropped = self.dropped.get(source, {})
            lines.append(f"{source}: {read} rows read, {sum(dropped.values())} dropped")
            for reason, count in sorted(dropped.items()):
                where = ", ".join(map(str, self.dropped_examples[source][reason]))
                lines.append(f"  dropped {count:>5}  {reason}: {DROP_REASONS[reason]} (first at {where})")
            if self.empty_response_kept.get(source):
                where = ", ".join(map(str, self.empty_response_examples[source]))
                count = self.empty_response_kept[source]
                lines.append(f"  kept    {count:>5}  empty_response: {EMPTY_RESPONSE_NOTE} (first at {where})")
        for split, kinds in self.truncated.items():
            parts = ", ".join(f"{kind} {count}" for kind, count in kinds.items())
            lines.append(f"{split}: {self.pairs.get(split, 0)} pairs; truncated: {parts}")
        return lines


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split an hh-rlhf pair into (prompt, chosen_response, rejected_response).

    The prompt is the text up to and including the last '\\n\\nAssistant:' that both sides share.
    """
    if not chosen.strip() or not rejected.strip():
        raise BadRow("empty_text")
    if chosen == rejected:
        raise BadRow("identical")
    if ASSISTANT_MARKER not in chosen or ASSISTANT_MARKER not in rejected:
        raise BadRow("no_assistant_marker")
    shared = os.path.commonprefix([chosen, rejected])
    end = shared.rfind(ASSISTANT_MARKER)
    if end < 0:
        raise BadRow("prompt_mismatch")
    end += len(ASSISTANT_MARKER)
    prompt, chosen_response, rejected_response = chosen[:end], chosen[end:], rejected[end:]
    if HUMAN_MARKER in chosen_response or HUMAN_MARKER in rejected_response:
        # The two sides diverge before their last turn: they answer different conversations.
        raise BadRow("prompt_mismatch")
    if not chosen_response.strip() and not rejected_response.strip():
        raise BadRow("identical")  # two empty answers: nothing to prefer
    # One empty (or whitespace-only) response is kept as "": tokenized, it is the end-of-sequence token alone.
    return prompt, _empty_if_blank(chosen_response), _empty_if_blank(rejected_response)


def _empty_if_blank(response: str) -> str:
    return response if response.strip() else ""


def _parse_row(row: Any) -> tuple[str, str, str]:
    if not isinstance(row, dict):
        raise BadRow("malformed_json")
    if "chosen" not in row or "rejected" not in row:
        raise BadRow("missing_field")
    if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
        raise BadRow("non_string_field")
    return split_dialogue(row["chosen"], row["rejected"])


def _local_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON or a BadRow) for each non-blank line of a .jsonl / .jsonl.gz file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield line_number, BadRow("invalid_utf8")
                    continue
                try:
                    yield line_number, json.loads(text)
                except json.JSONDecodeError:
                    yield line_number, BadRow("malformed_json")
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot be read as {'gzip ' if opener is gzip.open else ''}JSONL ({error})") from None


def _hub_rows(source: str, subset: str | None, split: str) -> Iterator[tuple[int, Any]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(source, data_dir=subset, split=split)
    except Exception as error:  # noqa: BLE001 - the hub raises many types; the user needs one line
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"dataset {source!r} (split {split!r}) could not be loaded: {message}") from None
    yield from enumerate(dataset)


def read_pairs(source: str, split: str, config: DataConfig, report: DataReport) -> list[PreferencePair]:
    """Read every row of a source, keeping valid pairs and recording each dropped row by reason."""
    if source == SYNTHETIC_SOURCE:
        from .synthetic import synthetic_rows

        rows = enumerate(synthetic_rows(split, config.num_pairs + config.num_test_pairs, seed=0))
        name = f"synthetic:{split}"
    elif _is_local(source):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{source}: data file not found")
        rows = _local_rows(path)
        name = str(path)
    else:
        rows = _hub_rows(source, config.subset, split)
        name = f"{source}:{split}"

    pairs, read = [], 0
    for index, row in rows:
        read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            prompt, chosen, rejected = _parse_row(row)
        except BadRow as bad:
            if config.strict:
                raise DataError(f"{name}:{index}: {DROP_REASONS[bad.reason]} (strict mode)") from None
            report.record_drop(name, bad.reason, index)
            continue
        if not chosen or not rejected:
            report.record_empty_response(name, index)
        pairs.append(PreferencePair(index, prompt, chosen, rejected))
    report.rows_read[name] = read
    if read == 0:
        raise DataError(f"{name}: no rows (the file is empty)")
    if not pairs:
        reasons = ", ".join(sorted(report.dropped.get(name, {})))
        raise DataError(f"{name}: none of its {read} rows is a usable preference pair ({reasons}); is it hh-rlhf JSONL?")
    return pairs


@dataclass
class TextSplits:
    train: list[PreferencePair]
    val: list[PreferencePair]
    test: list[PreferencePair]

    def indices(self) -> dict[str, list[int]]:
        return {name: [pair.index for pair in getattr(self, name)] for name in ("train", "val", "test")}


def load_text_splits(config: DataConfig, seed: int, report: DataReport, config_file: str = "config") -> TextSplits:
    """Sample train/val/test pairs deterministically from the seed."""
    rng = random.Random(seed)
    pool = read_pairs(config.source, config.train_split, config, report)
    separate_test = config.test_source is not None or not _is_local(config.source)
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
        test = [pool[i] for i in chosen[config.num_pairs :]]
    train_val = [pool[i] for i in chosen[: config.num_pairs]]
    num_val = max(1, round(config.num_pairs * config.val_fraction))
    return TextSplits(train=train_val[num_val:], val=train_val[:num_val], test=test)


def _is_local(source: str) -> bool:
    return source == SYNTHETIC_SOURCE or source.endswith(LOCAL_SUFFIXES) or Path(source).exists()


def truncate_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int, min_prompt_tokens: int
) -> tuple[list[int], list[int], list[int], dict[str, bool]]:
    """Fit prompt+response into max_length for both responses without dropping the pair.

    The responses are what DPO learns from, so they stay whole while they fit: the prompt loses its oldest tokens
    first (down to its last `min_prompt_tokens`), and only a response longer than what is then left is cut from
    the right.
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    kinds = {"prompt_cut_left": False, "response_cut_right": False}
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, chosen_ids, rejected_ids, kinds
    keep = max(max_length - longest, min(len(prompt_ids), min_prompt_tokens))
    if keep < len(prompt_ids):
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
        kinds["prompt_cut_left"] = True
    room = max_length - len(prompt_ids)
    if longest > room:
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        kinds["response_cut_right"] = True
    return prompt_ids, chosen_ids, rejected_ids, kinds


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer, config: DataConfig, split: str, report: DataReport
) -> Dataset:
    """Tokenize prompt and responses separately (so both responses share the exact prompt tokens) and truncate."""
    from datasets import Dataset

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not eos and any(not pair.chosen or not pair.rejected for pair in pairs):
        empty = next(pair.index for pair in pairs if not pair.chosen or not pair.rejected)
        raise DataError(f"{split} pair {empty}: a response is empty and the tokenizer has no end-of-sequence token to score it")

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    prompts = encode([p.prompt for p in pairs])
    chosens = [ids + eos for ids in encode([p.chosen for p in pairs])]
    rejecteds = [ids + eos for ids in encode([p.rejected for p in pairs])]
    columns: dict[str, list] = defaultdict(list)
    counts = {"prompt_cut_left": 0, "response_cut_right": 0}
    for pair, prompt_ids, chosen_ids, rejected_ids in zip(pairs, prompts, chosens, rejecteds):
        prompt_ids, chosen_ids, rejected_ids, kinds = truncate_pair(
            prompt_ids, chosen_ids, rejected_ids, config.max_length, config.min_prompt_tokens
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
        (run_dir / "data_report.json").write_text(json.dumps(self.report.to_dict(), indent=2))
        (run_dir / "data_indices.json").write_text(json.dumps(self.indices))


def prepare_data(splits: TextSplits, tokenizer, config: DataConfig, report: DataReport) -> PreparedData:
    return PreparedData(
        train=tokenize_pairs(splits.train, tokenizer, config, "train", report),
        val=tokenize_pairs(splits.val, tokenizer, config, "val", report),
        test=tokenize_pairs(splits.test, tokenizer, config, "test", report),
        report=report,
        indices=splits.indices(),
    )
