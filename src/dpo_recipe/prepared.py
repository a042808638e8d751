"""A run's prepared data (tokenized train/val/test, data report, indices), cached on disk.

Preparing 60k conversational pairs (read, validate, render, tokenize, truncate) takes minutes; reading it back takes
a second. An entry is keyed by everything that determines it, so it is never stale:
- the data config (every `data.*` setting except `num_proc` and `cache`, which change nothing in the result) and the
  seed;
- every local file a `*source` setting or `data.chat_template` names: its path, size and modification time, and its
  content hash when it is under CONTENT_HASH_LIMIT (a directory: each of its files' path, size and time);
- the tokenizer: a hash of the files `save_pretrained` writes (vocabulary, merges, special tokens, chat template),
  or, for a local BPE trained on the train pairs, its vocabulary size and training code (the entry keeps the
  trained tokenizer, which the data key determines);
- the code that prepares data (the data modules' source, as the reference cache hashes `packing.py`) and the
  versions of the libraries it calls.
Hub datasets are not cached: their revision can change under the same name.

Entries live in `<training.reference_cache_dir>/prepared/<key>/`, beside the reference log-probs and local tokenizers
they go with; `data.cache: false` turns the cache off. An entry is written under a temporary name and renamed, so a
reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .config import RecipeConfig
from .data import (
    DataReport, PreparedData, load_run_data, prepare_data, source_kind, tokenized_features, use_chat_template,
)  # fmt: skip
from .models import LOCAL_BPE, load_tokenizer
from .reference import code_digest

CACHE_FORMAT = "v1"
PACKAGE = Path(__file__).parent
# The modules whose code turns rows into token ids (sources.py, where the rows are read, once it exists).
DATA_CODE_FILES = ("config.py", "data.py", "sources.py", "synthetic.py", "prepared.py")
# Files up to this size are keyed by their content too; larger ones by path, size and modification time alone.
CONTENT_HASH_LIMIT = 64 * 2**20
# Settings that change how fast data is prepared, never what is prepared.
NOT_IN_KEY = ("num_proc", "cache")
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"


def _library_versions() -> str:
    import datasets
    import jinja2
    import tokenizers
    import transformers
    import trl

    return (f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, trl {trl.__version__}, "
            f"datasets {datasets.__version__}, jinja2 {jinja2.__version__}")  # fmt: skip


def _sources(value: Any, key: str = "") -> list[str]:
    """Every `*source` value in the data config (mixture entries too) and the chat template when it is a file."""
    if isinstance(value, dict):
        return [found for name, item in value.items() for found in _sources(item, name)]
    if isinstance(value, list):
        return [found for item in value for found in _sources(item, key)]
    if isinstance(value, str) and (key.endswith("source") or (key == "chat_template" and "{" not in value)):
        return [value]
    return []


def _file_identity(path: Path) -> list[Any]:
    stat = path.stat()
    identity: list[Any] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    if stat.st_size <= CONTENT_HASH_LIMIT:
        identity.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return identity


def source_identity(source: str) -> list[Any] | None:
    """What a source's data is, for the key; None for a hub dataset (not cacheable)."""
    if source_kind(source) == "synthetic":
        return [source]
    path = Path(source).expanduser()
    if path.is_file():
        return _file_identity(path)
    if path.is_dir():
        return [[str(file.relative_to(path)), file.stat().st_size, file.stat().st_mtime_ns]
                for file in sorted(path.rglob("*")) if file.is_file()]  # fmt: skip
    if source_kind(source) == "file":
        return [source, "missing"]  # reading it fails with the data error, before anything is cached
    return None


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what `save_pretrained` writes, less the directory it was loaded from."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        for file in sorted(Path(directory).iterdir()):
            content = file.read_bytes()
            if file.name == "tokenizer_config.json":
                settings = json.loads(content)
                settings.pop("name_or_path", None)
                content = json.dumps(settings, sort_keys=True).encode()
            digest.update(file.name.encode() + len(content).to_bytes(8, "little") + content)
    return digest.hexdigest()


def cache_key(config: RecipeConfig, tokenizer_part: str) -> str | None:
    """The entry's name, or None when a source is a hub dataset."""
    data = {key: value for key, value in dataclasses.asdict(config.data).items() if key not in NOT_IN_KEY}
    identities = [source_identity(source) for source in _sources(data)]
    if any(identity is None for identity in identities):
        return None
    parts = [CACHE_FORMAT, code_digest(*(PACKAGE / name for name in DATA_CODE_FILES)), _library_versions(),
             json.dumps(data, sort_keys=True, default=str), str(config.training.seed), json.dumps(identities),
             tokenizer_part]  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars from saving and loading: a run's stderr is for errors (one line each)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _save(entry: Path, data: PreparedData, tokenizer, keep_tokenizer: bool) -> None:
    temporary = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f"{entry.name}.", suffix=".tmp"))
    try:
        with _quiet_datasets():
            for split in SPLITS:
                if len(getattr(data, split)):  # `datasets` writes no shard for an empty one, nor loads that back
                    getattr(data, split).save_to_disk(str(temporary / split))
        uses_template = any(data.report.formats.get(source) in ("hh-rlhf-chat", "conversational", "conversational_implicit")
                            for source in data.report.formats)  # fmt: skip
        meta = {"report": data.report.to_dict(), "indices": data.indices, "chat_template": uses_template}
        (temporary / META_FILE).write_text(json.dumps(meta))
        if keep_tokenizer:
            tokenizer.save_pretrained(temporary / "tokenizer")
        with contextlib.suppress(OSError):  # another process wrote it first: the same content
            os.rename(temporary, entry)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _load(entry: Path) -> tuple[PreparedData, dict[str, Any]]:
    from datasets import Dataset, load_from_disk

    meta = json.loads((entry / META_FILE).read_text())
    empty = Dataset.from_dict({name: [] for name in tokenized_features()}, features=tokenized_features())
    with _quiet_datasets():
        splits = {split: load_from_disk(str(entry / split)) if (entry / split).is_dir() else empty for split in SPLITS}
    return PreparedData(**splits, report=DataReport(**meta["report"]), indices=meta["indices"]), meta


def prepare_run_data(
    config: RecipeConfig, tokenizer_source: str | None = None, main_process_first=contextlib.nullcontext
) -> tuple[Any, PreparedData, str]:
    """The run's tokenizer and prepared data, read from the cache when an entry matches, and a line saying which.

    `main_process_first` (distributed training) lets the main process prepare and fill the cache; the others then
    read the entry it wrote.
    """
    cache_dir = Path(config.training.reference_cache_dir) / "prepared"
    with main_process_first():
        trained_bpe = tokenizer_source is None and config.model.tokenizer == LOCAL_BPE
        tokenizer = None
        if not config.data.cache:
            key = None
        elif trained_bpe:
            key = cache_key(config, f"{LOCAL_BPE} {config.model.tokenizer_vocab_size} {code_digest(PACKAGE / 'models.py')}")
        else:
            tokenizer = load_tokenizer(config.model, source=tokenizer_source)
            key = cache_key(config, tokenizer_fingerprint(tokenizer))
        entry = cache_dir / key if key else None
        if entry is not None and entry.is_dir():
            data, meta = _load(entry)
            if trained_bpe:
                from transformers import PreTrainedTokenizerFast

                tokenizer = PreTrainedTokenizerFast.from_pretrained(entry / "tokenizer")
            if meta["chat_template"]:
                use_chat_template(tokenizer, config.data, "the pairs")
            sizes = ", ".join(f"{split} {len(getattr(data, split))}" for split in SPLITS)
            return tokenizer, data, f"prepared data: read from the cache {entry} ({sizes} pairs; nothing prepared)"
        loaded, splits, report = load_run_data(config, tokenizer_source, contextlib.nullcontext)
        tokenizer = tokenizer or loaded
        data = prepare_data(splits, tokenizer, config.data, report)
        if entry is None:
            why = "data.cache is false" if not config.data.cache else "a hub dataset's revision can change under its name"
            return tokenizer, data, f"prepared data: not cached ({why})"
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save(entry, data, tokenizer, keep_tokenizer=trained_bpe)
        return tokenizer, data, f"prepared data: cached in {entry} for the next run of this data"
