"""The layout of a run directory, in one place: what training writes and evaluation and reports read back.

    <output_dir>/<run_name>/
      config.yaml            the resolved config (its --set overrides included)
      data_report.json       every row read, dropped or truncated, by reason
      data_indices.json      which source rows went to train / val / test
      metrics.jsonl          one record per line: `epoch` (one per epoch), `step` and `eval` (see RECORD_KINDS)
      epoch-<k>/             a complete checkpoint; the name is only ever given to a finished save
        running_totals.json  the epoch's and the log line's running sums, for resuming inside them
        data_order_rng.safetensors  the RNG state the epoch's data order was drawn from, for resuming inside it
        scoring.json         how the model reads data and scores pairs (also in a `merge` output)
        eval_<data>.json     evaluation of that checkpoint on a dataset
      step-<N>/              a complete checkpoint at optimizer step N inside an epoch (training.save_steps, or a
                             signal under training.save_on_signal); the same contents as an epoch checkpoint
      best -> epoch-<k>      the best checkpoint by validation (an epoch, or a validated step-<N>), with best.json
                             saying by what (and its weights' step)
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

from .config import ConfigError, DataConfig, RecipeConfig
from .config_loader import load_config

EPOCH_PREFIX = "epoch-"
STEP_PREFIX = "step-"
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
DATA_ORDER_RNG_FILE = "data_order_rng.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
# Files in a checkpoint that only resuming reads; kept in the newest checkpoint alone. Optimizer state (Adam's two
# moments) is twice the size of the weights; FSDP's model shards repeat model.safetensors.
RESUME_ONLY_PREFIXES = ("optimizer", "scaler", "pytorch_model_fsdp", "running_totals", "data_order_rng")


def eval_file_name(dataset: str) -> str:
    return f"eval_{dataset}.json"


def reference_dir(run_dir: Path) -> Path:
    """Where a run keeps its locally built starting model, so evaluation uses exactly that reference."""
    return Path(run_dir) / REFERENCE_DIR


def _numbered_dirs(run_dir: Path, prefix: str) -> list[Path]:
    found = []
    for path in Path(run_dir).glob(f"{prefix}*"):
        suffix = path.name[len(prefix) :]
        if path.is_dir() and suffix.isdigit() and not path.is_symlink():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def epoch_dirs(run_dir: Path) -> list[Path]:
    """Complete epoch checkpoints, oldest first. Incomplete saves never carry the `epoch-` name."""
    return _numbered_dirs(run_dir, EPOCH_PREFIX)


def step_dirs(run_dir: Path) -> list[Path]:
    """Complete step checkpoints (`training.save_steps`, `training.save_on_signal`), oldest first."""
    return _numbered_dirs(run_dir, STEP_PREFIX)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint's weights were saved at."""
    return json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text())["global_step"]


def step_checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


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


def record_checkpoint(record: dict) -> str:
    """The checkpoint whose validation a record holds: an `eval` record names its step checkpoint, if one was saved
    at its step; an `epoch` record's is its epoch's."""
    return record.get("checkpoint") or f"{EPOCH_PREFIX}{record['epoch']}"


def checkpoint_records(run_dir: Path) -> list[dict]:
    """The records best-checkpoint selection compares: every epoch, and every validation at a step checkpoint."""
    return [r for r in _all_records(run_dir) if _is_epoch(r) or (r.get("kind") == "eval" and r.get("checkpoint"))]


def best_epoch(records: list[dict], metric: str) -> dict | None:
    """best.json of these records: the best one's epoch (fractional for a step checkpoint), step, value, checkpoint.
    Of equal values the first wins."""
    scored = [r for r in records if r.get("val")]
    if not scored:
        return None
    best = BEST_DIRECTION[metric](scored, key=lambda r: r["val"][metric])
    return {
        "epoch": best["epoch"], "step": best.get("step"), "metric": f"val_{metric}", "value": best["val"][metric],
        "checkpoint": record_checkpoint(best),
    }


def best_label(best: dict) -> str:
    """best.json in words: `epoch 2`, or `step-30 (epoch 0.62)` for a step checkpoint."""
    if best["checkpoint"].startswith(EPOCH_PREFIX):
        return f"epoch {best['epoch']}"
    return f"{best['checkpoint']} (epoch {best['epoch']:.2f})"


def best_record(run_dir: Path) -> tuple[dict, dict] | None:
    """(best.json, the metrics.jsonl record it was chosen from), or None before there is a best."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    best = json.loads(path.read_text())
    record = next((r for r in checkpoint_records(run_dir) if record_checkpoint(r) == best["checkpoint"]), None)
    return (best, record) if record is not None else None


def atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_best(run_dir: Path, metric: str) -> None:
    """best.json and the `best` link, over epoch checkpoints and validated step checkpoints. The best of these never
    loses its directory (`apply_retention` keeps it), and one that lost its directory was never the best: so the best
    always names a checkpoint that exists."""
    best = best_epoch(checkpoint_records(run_dir), metric)
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


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of either kind, oldest first (by the step their weights were saved at; an epoch checkpoint
    before a step checkpoint of the same step)."""
    kinds = [(0, path) for path in epoch_dirs(run_dir)] + [(1, path) for path in step_dirs(run_dir)]
    return [path for _, _, path in sorted((checkpoint_step(path), kind, path) for kind, path in kinds)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint --resume continues from: the newest complete one, epoch or step."""
    complete = all_checkpoints(run_dir)
    return complete[-1] if complete else None


def forget_records_after(run_dir: Path, step: int) -> None:
    """A run resumed from its checkpoint at optimizer step `step` rewrites what came after, so no record of a later
    step may linger: neither one whose save never completed nor one of a run that went on (an epoch record written
    just before its checkpoint's rename is one). Of an epoch saved twice, the record kept is the last one."""
    _write_records(run_dir, [r for r in _all_records(run_dir) if r["step"] <= step])
    keep_last_epoch_records(run_dir)
    for path in Path(run_dir).glob("checkpoint-*"):  # a save that never completed
        shutil.rmtree(path, ignore_errors=True)


def apply_retention(run_dir: Path, newest: Path, keep_epochs: str, keep_checkpoints: int | None = None) -> None:
    """Resume state only in the newest checkpoint (`newest`, just saved). With keep_epochs `best_and_last`, no other
    epoch than the best and the last; with keep_checkpoints N, no other step checkpoint than the newest N and the best.
    Neither ever deletes `newest` or the best."""
    best = (Path(run_dir) / BEST_LINK).resolve()
    epochs, steps = epoch_dirs(run_dir), step_dirs(run_dir)
    kept_steps = steps[-keep_checkpoints:] if keep_checkpoints else steps
    for checkpoint in epochs + steps:
        if checkpoint == newest:
            continue
        last_epoch = bool(epochs) and checkpoint == epochs[-1]
        unwanted = (
            (checkpoint in epochs and keep_epochs == "best_and_last" and not last_epoch)
            or (checkpoint in steps and checkpoint not in kept_steps)
        )
        if unwanted and checkpoint.resolve() != best:
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
    """Every epoch, or the best checkpoint (the `best` link the trainer keeps, which may be a step checkpoint; the last
    epoch if there is none)."""
    epochs = epoch_dirs(run_dir)
    best = run_dir / BEST_LINK
    if not all_epochs and best.is_dir():
        return [best.resolve()]
    if not epochs:
        raise ConfigError(f"{run_dir}: no complete epoch checkpoint to evaluate")
    return epochs if all_epochs else [epochs[-1]]


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
        if epoch_dirs(run) or (not all_epochs and (run / BEST_LINK).is_dir()):
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
    "training.overwrite", "training.save_steps", "training.keep_checkpoints", "training.save_on_signal",
    "data.strict", "run_name",
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
            f"long it trains, what it logs and which checkpoints it saves and keeps (training.num_epochs, max_steps, "
            f"early_stopping_patience, eval_steps, logging_steps, save_steps, keep_epochs, keep_checkpoints, "
            f"save_on_signal; logging.*): drop the change to resume, "
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
