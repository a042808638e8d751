"""The layout of a run directory, in one place: what training writes and evaluation and reports read back.

    <output_dir>/<run_name>/
      config.yaml            the resolved config (its --set overrides included)
      data_report.json       every row read, dropped or truncated, by reason
      data_indices.json      which source rows went to train / val / test
      metrics.jsonl          one record per line: `epoch` (one per epoch), `step` and `eval` (see RECORD_KINDS)
      epoch-<k>/             a complete checkpoint; the name is only ever given to a finished save
        running_totals.json  the epoch's and the log line's running sums, for resuming inside them
        scoring.json         how the model reads data and scores pairs (also in a `merge` output)
        eval_<data>.json     evaluation of that checkpoint on a dataset
      best -> epoch-<k>      the best epoch by validation, with best.json saying by what (and its weights' step)
      reference/             the starting model, when it was built locally (evaluation's reference)
      run_info.json          each training session's wall time, device and software; how early stopping ended it
      run_info.json          each training session's wall time, device and software; settings --resume changed
      README.md              the model card: usage in the run's data format, the training procedure
      tensorboard/           event files, when logging.report_to has tensorboard

Training, evaluation and reporting all read and write through these names and functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .config import ConfigError, DataConfig, RecipeConfig, load_config

EPOCH_PREFIX = "epoch-"
METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.json"
BEST_LINK = "best"
RUN_CONFIG_FILE = "config.yaml"
DATA_INDICES_FILE = "data_indices.json"
DATA_REPORT_FILE = "data_report.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TEST_DATASET = "test"
RUN_INFO_FILE = "run_info.json"
SCORING_FILE = "scoring.json"
MODEL_CARD_FILE = "README.md"  # TRL's model card, completed by `card`
TENSORBOARD_DIR = "tensorboard"
REFERENCE_DIR = "reference"
TOTALS_FILE = "running_totals.json"
# Files in a checkpoint that only resuming reads; kept in the newest epoch alone. Optimizer state (Adam's two moments)
# is twice the size of the weights; FSDP's model shards repeat model.safetensors.
RESUME_ONLY_PREFIXES = ("optimizer", "scaler", "pytorch_model_fsdp", "running_totals")


def eval_file_name(dataset: str) -> str:
    return f"eval_{dataset}.json"


def reference_dir(run_dir: Path) -> Path:
    """Where a run keeps its locally built starting model, so evaluation uses exactly that reference."""
    return Path(run_dir) / REFERENCE_DIR


def epoch_dirs(run_dir: Path) -> list[Path]:
    """Complete epoch checkpoints, oldest first. Incomplete saves never carry the `epoch-` name."""
    found = []
    for path in Path(run_dir).glob(f"{EPOCH_PREFIX}*"):
        suffix = path.name[len(EPOCH_PREFIX) :]
        if path.is_dir() and suffix.isdigit() and not path.is_symlink():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


# metrics.jsonl holds one record per line: `epoch` (train and val means of a whole epoch, with its checkpoint; one
# per epoch), `step` (the training means of one logging window) and `eval` (a validation pass every
# `training.eval_steps` steps).
RECORD_KINDS = ("epoch", "step", "eval")


def _all_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _write_records(run_dir: Path, records: list[dict]) -> None:
    atomic_write(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(run_dir: Path, kind: str = "epoch") -> list[dict]:
    return [record for record in _all_records(run_dir) if record.get("kind", "epoch") == kind]


def append_record(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _is_epoch(record: dict) -> bool:
    return record.get("kind", "epoch") == "epoch"


def keep_last_epoch_records(run_dir: Path) -> None:
    """One `epoch` record per epoch: the last one written, which describes the weights saved last under its name."""
    records = _all_records(run_dir)
    last = {r["epoch"]: i for i, r in enumerate(records) if _is_epoch(r)}
    kept = [r for i, r in enumerate(records) if not _is_epoch(r) or last[r["epoch"]] == i]
    if len(kept) < len(records):
        _write_records(run_dir, kept)


BEST_DIRECTION = {"loss": min, "accuracy": max, "margin": max}


def best_epoch(records: list[dict], metric: str) -> dict | None:
    scored = [r for r in records if r.get("val")]
    if not scored:
        return None
    best = BEST_DIRECTION[metric](scored, key=lambda r: r["val"][metric])
    return {
        "epoch": best["epoch"], "step": best.get("step"), "metric": f"val_{metric}", "value": best["val"][metric],
        "checkpoint": f"{EPOCH_PREFIX}{best['epoch']}",
    }


def atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_best(run_dir: Path, metric: str) -> None:
    best = best_epoch(read_metrics(run_dir), metric)
    if best is not None:
        atomic_write(run_dir / BEST_FILE, json.dumps(best, indent=2))
        point_best_link(run_dir, best["checkpoint"])


def point_best_link(run_dir: Path, target: str) -> None:
    link = run_dir / BEST_LINK
    temporary = run_dir / (BEST_LINK + ".tmp")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(target, target_is_directory=True)
    os.replace(temporary, link)


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = epoch_dirs(run_dir)
    return complete[-1] if complete else None


def forget_records_after(run_dir: Path, step: int) -> None:
    """A run resumed from its checkpoint at optimizer step `step` rewrites what came after, so no record of a later
    step may linger: neither one whose save never completed nor one of a run that went on (an epoch record written
    just before its checkpoint's rename is one). Of an epoch saved twice, the record kept is the last one."""
    _write_records(run_dir, [r for r in _all_records(run_dir) if r["step"] <= step])
    keep_last_epoch_records(run_dir)
    for path in Path(run_dir).glob("checkpoint-*"):  # a save that never completed
        shutil.rmtree(path, ignore_errors=True)


def apply_retention(run_dir: Path, newest: Path, keep_epochs: str) -> None:
    """Resume state only in the newest epoch; with `best_and_last`, no other epoch at all."""
    best = (Path(run_dir) / BEST_LINK).resolve()
    for checkpoint in epoch_dirs(run_dir):
        if checkpoint == newest:
            continue
        if keep_epochs == "best_and_last" and checkpoint.resolve() != best:
            shutil.rmtree(checkpoint)
            continue
        for path in checkpoint.iterdir():
            if path.name.startswith(RESUME_ONLY_PREFIXES):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG_FILE).is_file()


def is_run_dir(path: Path) -> bool:
    return (path / RUN_CONFIG_FILE).is_file()


def load_run_config(run_dir: Path) -> RecipeConfig:
    """The config the run was trained with (training writes it resolved, so no `base:` chain is needed)."""
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir}: not a run directory (no {RUN_CONFIG_FILE} written by training)")
    return load_config(run_dir / RUN_CONFIG_FILE)


def run_checkpoints(run_dir: Path, all_epochs: bool = False) -> list[Path]:
    """Every epoch, or the best one (the `best` link the trainer keeps; the last epoch if there is none)."""
    epochs = epoch_dirs(run_dir)
    if not epochs:
        raise ConfigError(f"{run_dir}: no complete epoch checkpoint to evaluate")
    if all_epochs:
        return epochs
    best = run_dir / BEST_LINK
    return [best.resolve()] if best.is_dir() else [epochs[-1]]


def find_runs(path: Path) -> list[Path]:
    """A run directory itself, or the runs directly under a directory such as `checkpoints/`."""
    path = Path(path)
    if is_run_dir(path):
        return [path]
    runs = sorted(child for child in path.iterdir() if is_run_dir(child)) if path.is_dir() else []
    if not runs:
        raise ConfigError(f"{path}: neither a run directory (with {RUN_CONFIG_FILE}) nor a directory of runs")
    return runs


def find_checkpoints(path: str | Path, all_epochs: bool = False) -> list[Path]:
    """Checkpoints named by a path: a checkpoint, a run (best or every epoch) or a directory of runs."""
    path = Path(path)
    if is_checkpoint(path):
        return [path.resolve()]  # `run/best` becomes `run/epoch-K`, so results land beside the real checkpoint
    if is_run_dir(path):
        return run_checkpoints(path, all_epochs)
    found = []
    for run in find_runs(path):
        if epoch_dirs(run):
            found.extend(run_checkpoints(run, all_epochs))
        else:
            print(f"skipping {run}: no complete epoch checkpoint", flush=True)
    return found


def checkpoint_epoch(checkpoint: Path) -> int | None:
    suffix = checkpoint.name[len(EPOCH_PREFIX) :]
    return int(suffix) if checkpoint.name.startswith(EPOCH_PREFIX) and suffix.isdigit() else None


# ---------------------------------------------------------------------------------------------------------------
# What a model directory needs to be scored as its run scored it, when it is read outside that run.


def scoring_settings(config: RecipeConfig, trained_format: str) -> dict[str, Any]:
    """How a model of this run reads data and scores pairs: written into every model directory the recipe writes
    (epoch checkpoints, `merge` outputs), so `eval`, `rank` and `generate` read a copy or a merge as the run did.

    `format` is data.format as configured (how a data file given with --data is read: `auto` detects it from its
    columns); `trained_format` is what the training data was read as (how rank and generate shape your prompts). The
    chat template that rendered messages is the one in the directory's tokenizer files.
    """
    data, loss = config.data, config.loss
    return {
        "data": {"format": data.format, "trained_format": trained_format, "max_length": data.max_length,
                 "min_prompt_tokens": data.min_prompt_tokens},
        "loss": {"type": loss.type, "beta": loss.beta, "label_smoothing": loss.label_smoothing, "rpo_alpha": loss.rpo_alpha},
    }  # fmt: skip


def write_scoring_settings(model_dir: Path, settings: dict[str, Any]) -> None:
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(model_dir) / SCORING_FILE, json.dumps(settings, indent=2) + "\n")


def read_scoring_settings(model_dir: Path) -> dict[str, Any] | None:
    path = Path(model_dir) / SCORING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def trained_format(directory: Path, data: DataConfig) -> str:
    """The format a run's training data was read in: data.format when it names one, else what was detected (the
    run's data_report.json, or a model directory's scoring.json); hh-rlhf, the study's format, when nothing says."""
    if data.format != "auto":
        return data.format
    report = Path(directory) / DATA_REPORT_FILE
    formats = json.loads(report.read_text()).get("formats", {}) if report.is_file() else {}
    if formats:
        return next(iter(formats.values()))  # the training source is read first
    recorded = read_scoring_settings(directory)
    return recorded["data"]["trained_format"] if recorded else "hh-rlhf"


# ---------------------------------------------------------------------------------------------------------------
# --resume: the run goes on with the recipe it was trained with.

# Keys a resumed run may change: how far it goes, what it records, which epochs it keeps, where its files live.
# Every other key shaped the epochs already trained; changed halfway, the run would mix two recipes (a β change,
# say, makes best-epoch selection compare validation losses taken at different β).
RESUMABLE_KEYS = (
    "training.num_epochs", "training.max_steps", "training.early_stopping_patience", "training.eval_steps",
    "training.logging_steps", "training.keep_epochs", "training.output_dir", "training.reference_cache_dir",
    "training.overwrite", "data.strict", "run_name",
)  # fmt: skip
RESUMABLE_SECTIONS = ("logging.",)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: RecipeConfig, config: RecipeConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, new value) for every key whose value differs; a key one side lacks is None there."""
    old, new = _flatten(saved.to_dict()), _flatten(config.to_dict())
    keys = list(old) + [key for key in new if key not in old]
    return [(key, old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)]


def resumable(key: str) -> bool:
    return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_SECTIONS)


def check_resumed_config(config: RecipeConfig) -> list[tuple[str, Any, Any]]:
    """The changes --resume makes to the run's saved config.yaml; any that is not resumable is a ConfigError naming
    each key, its old and new values (and the --set flag that gave a new one), and the ways out."""
    changes = config_changes(load_run_config(config.run_dir), config)
    refused = [(key, old, new) for key, old, new in changes if not resumable(key)]
    if refused:
        listed = "; ".join(
            f"{key} {old!r} → {new!r}" + (f" ({config.origin(key)})" if config.origin(key) != config.source_file else "")
            for key, old, new in refused
        )
        raise ConfigError(
            f"--resume: {config.run_dir} was trained with other settings: {listed}. A resumed run may change only how "
            f"long it trains, what it logs and which epochs it keeps (training.num_epochs, max_steps, "
            f"early_stopping_patience, eval_steps, logging_steps, keep_epochs; logging.*): drop the change to resume, "
            f"or start over with --overwrite, or train it as a new run with --set run_name=<new name>"
        )
    return [(key, old, new) for key, old, new in changes if key != "training.overwrite"]


def record_config_changes(run_dir: Path, changes: list[tuple[str, Any, Any]], step: int, epoch: int) -> None:
    """Resumable changes go into run_info.json with the step (and epoch) they apply from, so the run's record says
    that epochs after it ran on other settings."""
    if not changes:
        return
    path = Path(run_dir) / RUN_INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() else {"sessions": []}
    info.setdefault("config_changes", []).extend(
        {"from_step": step, "after_epoch": epoch, "key": key, "old": old, "new": new} for key, old, new in changes
    )
    atomic_write(path, json.dumps(info, indent=2))
