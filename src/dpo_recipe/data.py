"""Preference data in every format TRL's DPOTrainer reads: read, validate, split into prompt/responses, sample,
tokenize, truncate.

Formats (`data.format`, detected from the first row's columns when `auto`):
- `hh-rlhf`: `{chosen, rejected}` transcripts with `\n\nHuman:` / `\n\nAssistant:` turns; the prompt is everything up
  to the last shared `\n\nAssistant:`.
- `hh-rlhf-chat`: the same transcripts, turned into user/assistant messages and rendered with the chat template.
- `standard`: `{prompt, chosen, rejected}` strings.
- `standard_implicit`: `{chosen, rejected}` strings without hh-rlhf turns; the prompt is their longest common
  prefix, a trailing space going to the responses (TRL's `extract_prompt` rule).
- `conversational`: `{prompt, chosen, rejected}` lists of `{role, content}` messages.
- `conversational_implicit`: `{chosen, rejected}` message lists; the prompt is their shared leading messages. A
  `prompt` string beside them (UltraFeedback-binarized) is ignored, as TRL's `maybe_extract_prompt` ignores it.
Other columns are ignored, except `tools` and `chat_template_kwargs`, which chat formats pass to the chat template.

Messages stay messages until tokenization, which renders them with the tokenizer's chat template. Every format is
tokenized as TRL 1.16's DPOTrainer tokenizes it (`encode_pairs`), then truncated the recipe's way (`truncate_pair`).

Nothing is lost silently: every dropped row is counted by reason (with its first line or row numbers) and every
truncated pair is counted by kind, in a `DataReport` that the trainer prints and writes to the run directory.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import itertools
import multiprocessing
import json
import os
import random
import re
import zlib
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, DataConfig, RecipeConfig
from .rundir import DATA_INDICES_FILE, DATA_REPORT_FILE

if TYPE_CHECKING:  # `datasets` takes seconds to import; a bad config or data file should fail before that
    from datasets import Dataset

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
SYNTHETIC_SOURCE = "synthetic"
JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")  # a JSON array, or JSON lines
TABLE_LOADERS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}  # read by `datasets`' own loaders
LOCAL_SUFFIXES = JSON_LINES_SUFFIXES + JSON_SUFFIXES + tuple(TABLE_LOADERS)
EXAMPLE_LINES_PER_REASON = 5
CHAT_FORMATS = ("hh-rlhf-chat", "conversational", "conversational_implicit")
EXPLICIT_PROMPT_FORMATS = ("standard", "conversational")

DROP_REASONS = {
    "invalid_utf8": "line is not valid UTF-8",
    "malformed_json": "line is not a JSON object",
    "missing_field": "'chosen' or 'rejected' (or the format's 'prompt') is missing",
    "non_string_field": "'chosen' or 'rejected' (or the format's 'prompt') is not a string",
    "malformed_messages": "a field is not a list of {role, content} messages with string values",
    "malformed_template_columns": (
        "'tools' is not a list (or JSON text of one), or 'chat_template_kwargs' is not a mapping (without "
        "add_generation_prompt, tokenize or return_dict)"
    ),
    "empty_text": "'chosen' or 'rejected' is empty",
    "empty_prompt": "the prompt (given, or shared by chosen and rejected) is empty",
    "identical": "chosen equals rejected, or both responses are empty",
    "no_assistant_marker": "no '\\n\\nAssistant:' marker",
    "prompt_mismatch": "chosen and rejected have different prompts",
    "no_response": "chosen or rejected has no message after the shared prompt",
}
# Kept, but counted: a rater may prefer saying nothing (hh-rlhf harmless-base has such pairs). As in TRL, the empty
# response is scored as its end-of-sequence token alone.
EMPTY_RESPONSE_NOTE = "a response is empty; kept, scored as its end-of-sequence token alone"
# Where tokenizing prompt + response whole (as TRL does) differs from tokenizing the parts apart; counted per split.
TOKENIZATION_NOTES = {
    "prompt_end_left_out": (
        "the prompt's last tokens change once a response follows (tokens merge across the boundary, or the chat "
        "template renders the prompt's end differently); as in TRL they are left out of the prompt"
    ),
    "eos_text_in_response": "a text response already ends with the end-of-sequence text; as in TRL none is added",
}
# Arguments the tokenization step gives the chat template itself; a row's chat_template_kwargs cannot set them.
TEMPLATE_ARGUMENTS = frozenset({"add_generation_prompt", "tokenize", "return_dict"})


class DataError(ValueError):
    """A data problem that stops the run, worded as one line naming the file (and line)."""


class BadRow(ValueError):
    def __init__(self, reason: str):
        super().__init__(DROP_REASONS[reason])
        self.reason = reason


Messages = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]


@dataclass
class PreferencePair:
    # 1-based line number of a JSON-lines file; 0-based row index of a table (hub split, parquet, csv, JSON array)
    index: int
    # Text, or message lists that the tokenizer's chat template renders (the chat formats).
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    # The row's `tools` and `chat_template_kwargs`, for the chat template (chat formats only, as in TRL).
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # The source as the data report names it: a file, `dataset:split` or `synthetic:split`.
    source: str = ""

    def texts(self) -> list[str]:
        """The pair's plain text (message contents for chat formats), for training a tokenizer on it."""
        return [part if isinstance(part, str) else "\n".join(m.get("content") or "" for m in part)
                for part in (self.prompt, self.chosen, self.rejected)]  # fmt: skip


@dataclass
class DataReport:
    """What happened to every row: kept, dropped (by reason) or truncated (by kind)."""

    rows_read: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped_examples: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    truncated: dict[str, dict[str, int]] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)  # the format each source was read as
    empty_response_kept: dict[str, int] = field(default_factory=dict)
    empty_response_examples: dict[str, list[int]] = field(default_factory=dict)
    # Rows whose `tools` / `chat_template_kwargs` reach the chat template, by source.
    template_kwargs_rows: dict[str, int] = field(default_factory=dict)
    # Per split: counts of TOKENIZATION_NOTES.
    tokenization: dict[str, dict[str, int]] = field(default_factory=dict)

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
            lines.append(f"  format  {self.formats.get(source, 'hh-rlhf')}")
            for reason, count in sorted(dropped.items()):
                where = ", ".join(map(str, self.dropped_examples[source][reason]))
                lines.append(f"  dropped {count:>5}  {reason}: {DROP_REASONS[reason]} (first at {where})")
            if self.empty_response_kept.get(source):
                where = ", ".join(map(str, self.empty_response_examples[source]))
                count = self.empty_response_kept[source]
                lines.append(f"  kept    {count:>5}  empty_response: {EMPTY_RESPONSE_NOTE} (first at {where})")
            if self.template_kwargs_rows.get(source):
                count = self.template_kwargs_rows[source]
                lines.append(f"  kept    {count:>5}  with tools or chat_template_kwargs, passed to the chat template")
        for split, kinds in self.truncated.items():
            parts = ", ".join(f"{kind} {count}" for kind, count in kinds.items())
            lines.append(f"{split}: {self.pairs.get(split, 0)} pairs; truncated: {parts}")
            for note, count in self.tokenization.get(split, {}).items():
                lines.append(f"  {note} {count}: {TOKENIZATION_NOTES[note]}")
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


def hh_messages(dialogue: str) -> Messages:
    """hh-rlhf turns as chat messages: "\\n\\nHuman: a\\n\\nAssistant: b" -> user a, assistant b.

    A trailing empty "\\n\\nAssistant:" (a prompt's generation cue) is left to the chat template's generation prompt.
    """
    parts = re.split(r"\n\n(Human|Assistant):", dialogue)
    messages = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _split_hh_chat(chosen: str, rejected: str) -> tuple[Messages, Messages, Messages]:
    prompt, chosen_response, rejected_response = split_dialogue(chosen, rejected)
    return (hh_messages(prompt), [{"role": "assistant", "content": chosen_response.strip()}],
            [{"role": "assistant", "content": rejected_response.strip()}])  # fmt: skip


def _split_standard(prompt: str, chosen: str, rejected: str) -> tuple[str, str, str]:
    if not prompt.strip():
        raise BadRow("empty_prompt")
    if chosen == rejected or not (chosen.strip() or rejected.strip()):
        raise BadRow("identical")
    return prompt, chosen, rejected  # verbatim, as TRL tokenizes them: a blank response keeps its whitespace


def _split_standard_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    from trl.data_utils import common_prefix_length

    if not chosen.strip() or not rejected.strip():
        raise BadRow("empty_text")
    if chosen == rejected:
        raise BadRow("identical")
    end = common_prefix_length(chosen, rejected)
    if end and chosen[end - 1] == " ":  # as TRL's extract_prompt: the space before the responses is theirs
        end -= 1
    return _split_standard(chosen[:end], chosen[end:], rejected[end:])


def read_messages(value: Any) -> Messages:
    """Messages with a string role and content (a message carrying `tool_calls` may have no content)."""
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and (isinstance(m.get("content"), str) or (m.get("content") is None and m.get("tool_calls")))
        for m in value
    )  # fmt: skip
    if not ok:
        raise BadRow("malformed_messages")
    # Keys set to None are left out: a hub column of structs gives every message every key any message has (None
    # where it had none), which a chat template testing `is defined` would render.
    return [{key: item for key, item in m.items() if item is not None} for m in value]


def _blank(response: str | Messages) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return all(not (m.get("content") or "").strip() for m in response)


def _split_conversational(prompt: Messages, chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    if not prompt:
        raise BadRow("empty_prompt")
    if not chosen or not rejected:
        raise BadRow("no_response")
    if chosen == rejected or (_blank(chosen) and _blank(rejected)):
        raise BadRow("identical")
    return prompt, chosen, rejected


def _split_conversational_implicit(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    from trl.data_utils import common_prefix_length

    if chosen == rejected:
        raise BadRow("identical")
    end = common_prefix_length(chosen, rejected)
    return _split_conversational(chosen[:end], chosen[end:], rejected[end:])


SPLITTERS = {
    "hh-rlhf": split_dialogue,
    "hh-rlhf-chat": _split_hh_chat,
    "standard": _split_standard,
    "standard_implicit": _split_standard_implicit,
    "conversational": _split_conversational,
    "conversational_implicit": _split_conversational_implicit,
}


def detect_format(row: Any) -> str | None:
    """The format a row's columns and types say it is in; None for a row that says nothing (not an object).

    As TRL's `maybe_extract_prompt`: a `prompt` of another kind than the responses (UltraFeedback-binarized's
    string beside conversations) is not the prompt; the responses' shared beginning is.
    """
    if not isinstance(row, dict) or "chosen" not in row:
        return None
    chat = isinstance(row["chosen"], list)
    if "prompt" in row and isinstance(row["prompt"], list) == chat:
        return "conversational" if chat else "standard"
    if chat:
        return "conversational_implicit"
    return "hh-rlhf" if isinstance(row["chosen"], str) and ASSISTANT_MARKER in row["chosen"] else "standard_implicit"


def _template_kwargs(row: dict) -> dict[str, Any]:
    """A row's `tools` (a list, or JSON text of one) and `chat_template_kwargs`, merged as TRL merges them."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise BadRow("malformed_template_columns") from None
    extra = row.get("chat_template_kwargs") or {}
    if (tools is not None and not isinstance(tools, list)) or not isinstance(extra, dict) or TEMPLATE_ARGUMENTS & extra.keys():
        raise BadRow("malformed_template_columns")
    return ({"tools": tools} if tools is not None else {}) | extra


def _parse_row(row: Any, data_format: str, index: int, source: str) -> PreferencePair:
    if not isinstance(row, dict):
        raise BadRow("malformed_json")
    keys = ("prompt", "chosen", "rejected") if data_format in EXPLICIT_PROMPT_FORMATS else ("chosen", "rejected")
    if any(key not in row for key in keys):
        raise BadRow("missing_field")
    template_kwargs = {}
    if data_format in ("conversational", "conversational_implicit"):
        values = [read_messages(row[key]) for key in keys]
        template_kwargs = _template_kwargs(row)
    elif all(isinstance(row[key], str) for key in keys):
        values = [row[key] for key in keys]
    else:
        raise BadRow("non_string_field")
    return PreferencePair(index, *SPLITTERS[data_format](*values), template_kwargs=template_kwargs, source=source)


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


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """A .json file holding one JSON array (rows numbered from 0), or JSON lines (numbered by line)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4096).lstrip()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot be read as {'gzip ' if opener is gzip.open else ''}JSON ({error})") from None
    if not head.startswith(b"["):
        yield from _local_rows(path)
        return
    with opener(path, "rb") as handle:
        try:
            rows = json.loads(handle.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{path}: not a valid JSON array ({error})") from None
    yield from enumerate(rows)


def _load_error(what: str, error: BaseException) -> DataError:
    while error.__cause__ is not None and not str(error).strip(" ."):
        error = error.__cause__
    if "error occurred while generating the dataset" in str(error) and error.__cause__ is not None:
        error = error.__cause__  # `datasets` wraps the reader's own error, which says what is wrong
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DataError(f"{what} could not be loaded: {message}")


def _table_rows(path: Path, loader: str) -> Iterator[tuple[int, Any]]:
    from datasets import load_dataset

    # An empty CSV cell is an empty string (an empty response), not a missing value.
    options = {"keep_default_na": False} if loader == "csv" else {}
    try:
        dataset = load_dataset(loader, data_files=str(path), split="train", **options)
    except Exception as error:  # noqa: BLE001 - pyarrow and pandas raise many types; the user needs one line
        raise _load_error(f"{path} ({loader})", error) from None
    yield from enumerate(dataset)


def _hub_rows(source: str, config: DataConfig, split: str) -> Iterator[tuple[int, Any]]:
    """A hub dataset, or a local directory laid out like one (e.g. harmless-base/train.jsonl.gz, or configurations
    declared in its README.md): the same call, with the configuration (`data.config_name`) and `data_dir`
    (`data.subset`)."""
    from datasets import load_dataset

    configuration = f" configuration {config.config_name!r}" if config.config_name else ""
    try:
        dataset = load_dataset(source, name=config.config_name, data_dir=config.subset, split=split)
    except Exception as error:  # noqa: BLE001 - the hub raises many types; the user needs one line
        raise _load_error(f"dataset {source!r}{configuration} (split {split!r})", error) from None
    yield from enumerate(dataset)


def _resolve_format(rows: Iterator[tuple[int, Any]], forced: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """The forced format, or the one the first row that says anything is in (hh-rlhf when none does)."""
    if forced != "auto":
        return forced, rows
    seen = []
    for index, row in rows:
        seen.append((index, row))
        detected = detect_format(row)
        if detected is not None:
            return detected, itertools.chain(seen, rows)
    return "hh-rlhf", iter(seen)


def read_pairs(source: str, split: str, config: DataConfig, report: DataReport) -> list[PreferencePair]:
    """Read every row of a source, keeping valid pairs and recording each dropped row by reason."""
    kind = source_kind(source)
    if kind == "synthetic":
        from .synthetic import synthetic_rows

        rows = enumerate(synthetic_rows(split, config.num_pairs + config.num_test_pairs, seed=0))
        name = f"synthetic:{split}"
    elif kind == "file":
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{source}: data file not found")
        loader = next((TABLE_LOADERS[suffix] for suffix in TABLE_LOADERS if source.endswith(suffix)), None)
        rows = _table_rows(path, loader) if loader else _json_rows(path) if source.endswith(JSON_SUFFIXES) else _local_rows(path)
        name = str(path)
    else:
        rows = _hub_rows(source, config, split)
        name = f"{source}:{split}"

    data_format, rows = _resolve_format(rows, config.format)
    report.formats[name] = data_format
    pairs, read = [], 0
    for index, row in rows:
        read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            pair = _parse_row(row, data_format, index, name)
        except BadRow as bad:
            if config.strict:
                raise DataError(f"{name}:{index}: {DROP_REASONS[bad.reason]} (strict mode)") from None
            report.record_drop(name, bad.reason, index)
            continue
        if _blank(pair.chosen) or _blank(pair.rejected):
            report.record_empty_response(name, index)
        if pair.template_kwargs:
            report.template_kwargs_rows[name] = report.template_kwargs_rows.get(name, 0) + 1
        pairs.append(pair)
    report.rows_read[name] = read
    if read == 0:
        raise DataError(f"{name}: no rows (the file is empty)")
    if not pairs:
        reasons = ", ".join(sorted(report.dropped.get(name, {})))
        raise DataError(
            f"{name}: none of its {read} rows is a usable preference pair in the {data_format} format ({reasons}); "
            f"set data.format if it is in another"
        )
    return pairs


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


def source_kind(source: str) -> str:
    """`synthetic`, a local `file`, or a `dataset`: a hub id or a local directory laid out like a hub dataset."""
    if source == SYNTHETIC_SOURCE:
        return "synthetic"
    if source.endswith(LOCAL_SUFFIXES) or Path(source).is_file():
        return "file"
    return "dataset"


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
