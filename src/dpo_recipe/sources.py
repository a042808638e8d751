"""Preference rows read from every source and format TRL's DPOTrainer reads, validated and split into prompt and
responses; what happened to each row is counted in a `DataReport`.

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

Messages stay messages until tokenization (`dpo_recipe.data`), which renders them with the tokenizer's chat template.
Nothing is lost silently: every dropped row is counted by reason, with its first lines or row numbers.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
SYNTHETIC_SOURCE = "synthetic"
JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")  # a JSON array, or JSON lines
TABLE_LOADERS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}  # read by `datasets`' own loaders
LOCAL_SUFFIXES = JSON_LINES_SUFFIXES + JSON_SUFFIXES + tuple(TABLE_LOADERS)
EXAMPLE_LINES_PER_REASON = 5
SPLITS = ("train", "val", "test")
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


class UnknownSplit(DataError):
    """A split a dataset does not have; `splits` are the ones it has."""

    def __init__(self, dataset: str, split: str, splits: list[str]):
        super().__init__(f"dataset {dataset} has no split {split!r} (its splits: {', '.join(splits)})")
        self.dataset, self.split, self.splits = dataset, split, splits


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
    # Source -> split (train, val, test) -> pairs drawn from it; and how each source's pairs were chosen.
    pairs_by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    selection: dict[str, str] = field(default_factory=dict)

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
        for source, splits in self.pairs_by_source.items():
            counts = ", ".join(f"{count} {split}" for split, count in splits.items())
            lines.append(f"pairs from {source}: {counts} ({self.selection.get(source, '')})")
        if len(self.pairs_by_source) > 1:
            totals = {split: sum(splits[split] for splits in self.pairs_by_source.values()) for split in SPLITS}
            lines.append("pairs from all sources: " + ", ".join(f"{count} {split}" for split, count in totals.items()))
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
        unknown = re.match(r"Unknown split .*Should be one of \[(.*)\]", str(error))
        if unknown:
            raise UnknownSplit(f"{source!r}{configuration}", split, re.findall(r"'([^']*)'", unknown.group(1))) from None
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


def source_kind(source: str) -> str:
    """`synthetic`, a local `file`, or a `dataset`: a hub id or a local directory laid out like a hub dataset."""
    if source == SYNTHETIC_SOURCE:
        return "synthetic"
    if source.endswith(LOCAL_SUFFIXES) or Path(source).is_file():
        return "file"
    return "dataset"
