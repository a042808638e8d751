"""Reading a run's configuration: YAML files over a shared base, command-line overrides, types, validation.

A run file names its base with `base: base.yaml` (relative to the file) and holds only what differs.
Every problem is raised as `ConfigError` with the file and the dotted key, so the CLI can print one line.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .config import (
    ALL_PAIRS, CHOICES, DATA_FORMATS, LOSS_TYPES, OPTIMIZERS, REPORT_TARGETS, SHARED_PROMPT_ATTENTION, TRL_LOSS_NAMES,
    ConfigError, DataConfig, RecipeConfig, key_origin, looks_like_local_path, loss_function_path, mixture_format_conflict,
)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    data = _read_yaml(path)
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: key 'base' must be a file name")
    return _merge(_load_with_bases(path.parent / base_name, seen + (path,)), data)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, for example training.learning_rate=5e-5")
    key, raw = text.split("=", 1)
    if not raw.strip():
        return key.strip().split("."), None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:  # text that is not YAML (a Jinja chat template: "{% for m in messages %}...") is text
        value = raw
    return key.strip().split("."), value


def _coerce(value: Any, annotation: Any, where: dict[str, str], key: str) -> Any:
    """Convert a YAML value to the dataclass field's type, or raise naming its source, the key and what is allowed.

    `where` maps dotted keys set by `--set` to that flag; every other key names the file (`where[""]`).
    """
    file = key_origin(where, key, where[""])
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        choices = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(choices) > 1:  # `str | list[str]`: the form the value was written in, else the first one's message
            matching = [a for a in choices if isinstance(value, typing.get_origin(a) or a)]
            return _coerce(value, (matching or choices)[0], where, key)
        return _coerce(value, choices[0], where, key)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: {key} must be a mapping of {annotation.__name__} keys, got {value!r}")
        return _build(annotation, value, where, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{file}: {key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(item, item_type, where, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads `1e-4` (no dot) as a string, so numeric strings count as numbers.
        try:
            return float(value)
        except ValueError:
            pass
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[annotation]
    if isinstance(value, expected) and (annotation is bool or not isinstance(value, bool)):
        return float(value) if annotation is float else value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(f"{file}: {key} must be {names[annotation]}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: dict[str, str], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = sorted(f.name for f in dataclasses.fields(cls) if f.name not in ("source_file", "overrides"))
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{key_origin(where, dotted, where[''])}: unknown key '{dotted}' (allowed here: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], where, dotted)
    return cls(**kwargs)


def _validate(config: RecipeConfig) -> None:
    checks = [
        ("loss.beta", config.loss.beta > 0, "must be > 0"),
        ("loss.label_smoothing", 0 <= config.loss.label_smoothing < 0.5, "must be in [0, 0.5)"),
        ("loss.rpo_alpha", (config.loss.rpo_alpha or 0) >= 0, "must be >= 0 or null"),
        ("training.learning_rate", config.training.learning_rate > 0, "must be > 0"),
        ("training.num_epochs", config.training.num_epochs >= 1, "must be >= 1"),
        ("training.effective_batch_size", config.training.effective_batch_size >= 1, "must be >= 1"),
        ("training.per_device_batch_size", config.training.per_device_batch_size >= 1, "must be >= 1"),
        ("training.eval_batch_size", (config.training.eval_batch_size or 1) >= 1, "must be >= 1 or null"),
        ("training.length_buckets", (config.training.length_buckets or 0) >= 0, "must be >= 0 or null"),
        ("training.pad_to_multiple_of", (config.training.pad_to_multiple_of or 1) >= 1, "must be >= 1 or null"),
        ("training.max_steps", (config.training.max_steps or 1) >= 1, "must be >= 1 or null"),
        ("training.eval_steps", (config.training.eval_steps or 1) >= 1, "must be >= 1 or null"),
        ("training.save_steps", (config.training.save_steps or 1) >= 1, "must be >= 1 or null"),
        (
            "training.save_steps",
            not (config.training.save_steps and config.training.eval_steps)
            or config.training.save_steps % config.training.eval_steps == 0,
            (f"must be a multiple of training.eval_steps ({config.training.eval_steps}), so that every step "
             "checkpoint is validated and can be the best one"),
        ),
        ("training.keep_checkpoints", (config.training.keep_checkpoints or 1) >= 1, "must be >= 1 or null"),
        (
            "training.keep_checkpoints",
            config.training.keep_checkpoints is None or config.training.save_steps or config.training.save_on_signal,
            "bounds step checkpoints, which only training.save_steps or training.save_on_signal write: set one of them",
        ),
        ("training.logging_steps", config.training.logging_steps >= 1, "must be >= 1"),
        ("training.early_stopping_patience", (config.training.early_stopping_patience or 1) >= 1, "must be >= 1 or null"),
        ("training.warmup_ratio", 0 <= config.training.warmup_ratio < 1, "must be in [0, 1)"),
        ("training.warmup_steps", config.training.warmup_steps >= 0, "must be >= 0"),
        (
            "training.warmup_steps",
            not (config.training.warmup_steps and config.training.warmup_ratio),
            f"and training.warmup_ratio ({config.training.warmup_ratio}) are both set: keep one",
        ),
        (
            "training.optim",
            config.training.optim is None or config.training.optim in OPTIMIZERS,
            f"must be one of {', '.join(OPTIMIZERS)} or null",
        ),
        ("training.adam_beta1", 0 <= config.training.adam_beta1 < 1, "must be in [0, 1)"),
        ("training.adam_beta2", 0 <= config.training.adam_beta2 < 1, "must be in [0, 1)"),
        ("training.adam_epsilon", config.training.adam_epsilon > 0, "must be > 0"),
        (
            "model.revision",
            config.model.revision is None or (config.model.tiny is None and not looks_like_local_path(config.model.name_or_path or "")),
            "applies to hub models only, not to a local directory or a tiny model",
        ),
        ("data.max_length", config.data.max_length >= 16, "must be >= 16"),
        ("data.val_fraction", 0 < config.data.val_fraction < 1, "must be in (0, 1)"),
        ("data.num_proc", config.data.num_proc is None or config.data.num_proc >= 1, "must be >= 1 or null"),
        ("data.config_name", config.data.config_name is None or config.data.config_name.strip() != "", "must be a configuration name or null"),
        (
            "data.chat_template",
            config.data.chat_template is None or "{" in config.data.chat_template or Path(config.data.chat_template).is_file(),
            "must be a Jinja template or the path of a file holding one",
        ),
        ("data.min_prompt_tokens", 1 <= config.data.min_prompt_tokens < config.data.max_length, "must be in [1, max_length)"),
        ("model.tokenizer_vocab_size", config.model.tokenizer_vocab_size >= 260, "must be >= 260 (256 bytes + specials)"),
    ]
    for key, ok, rule in checks:
        if not ok:
            value = _get(config, key.split("."))
            raise ConfigError(f"{config.origin(key)}: {key} {rule} (got {value!r})")
    _validate_pair_counts(config)
    for key, allowed in CHOICES.items():
        value = _get(config, key.split("."))
        if value not in allowed:
            raise ConfigError(f"{config.origin(key)}: {key} must be one of {', '.join(allowed)} (got {value!r})")
    if config.training.prompt_sharing and config.model.attn_implementation not in SHARED_PROMPT_ATTENTION:
        raise ConfigError(
            f"{config.origin('model.attn_implementation')}: model.attn_implementation {config.model.attn_implementation!r} "
            f"cannot read the shared-prompt mask: use one of {', '.join(SHARED_PROMPT_ATTENTION)}, or set training.prompt_sharing: false"
        )
    if config.loss.type not in LOSS_TYPES and loss_function_path(config.loss.type) is None:
        raise ConfigError(
            f"{config.origin('loss.type')}: loss.type must be one of {', '.join(LOSS_TYPES)} (or TRL's "
            f"{', '.join(f'{trl} for {ours}' for trl, ours in TRL_LOSS_NAMES.items())}), or a dotted path "
            f"package.module:function to a loss of your own (got {config.loss.type!r})"
        )
    for target in config.logging.report_to:
        if target not in REPORT_TARGETS:
            raise ConfigError(f"{config.origin('logging.report_to')}: logging.report_to must list some of {', '.join(REPORT_TARGETS)} (got {target!r})")
    if config.model.lora is not None and config.model.lora.r < 1:
        raise ConfigError(f"{config.origin('model.lora.r')}: model.lora.r must be >= 1 (got {config.model.lora.r})")
    quantization = config.model.quantization
    if quantization is not None:
        # The block, or any key in it, may have come from a flag.
        block_origin = next((flag for key, flag in config.overrides.items() if key.startswith("model.quantization")), config.source_file)
        for key, value, allowed in (
            ("bits", quantization.bits, (4, 8)),
            ("quant_type", quantization.quant_type, ("nf4", "fp4")),
            ("compute_dtype", quantization.compute_dtype, ("auto", "bf16", "fp16", "fp32")),
        ):
            if value not in allowed:
                where = config.origin(f"model.quantization.{key}")
                raise ConfigError(f"{where}: model.quantization.{key} must be one of {', '.join(map(str, allowed))} (got {value!r})")
        if config.model.lora is None:
            raise ConfigError(
                f"{block_origin}: model.quantization trains a LoRA adapter on a frozen quantized "
                "base: add model.lora (e.g. --set model.lora.r=16)"
            )
        if config.model.tiny is not None:
            raise ConfigError(
                f"{block_origin}: model.quantization loads a saved model through bitsandbytes: "
                "set model.name_or_path (a hub id or directory) instead of model.tiny"
            )
    if config.model.tiny is None and not config.model.name_or_path:
        raise ConfigError(f"{config.origin('model.name_or_path')}: model.name_or_path must name a hub model or a local directory (or set model.tiny)")
    # `..` or `.` would make the run directory the output directory's parent or itself, which --overwrite removes.
    if not config.run_name or "/" in config.run_name or config.run_name in (".", ".."):
        raise ConfigError(f"{config.origin('run_name')}: run_name must be a non-empty name without '/' (got {config.run_name!r})")


def _check_count(config: RecipeConfig, key: str, value: Any, smallest: int) -> None:
    if value != ALL_PAIRS and (isinstance(value, bool) or not isinstance(value, int) or value < smallest):
        rule = f"an integer >= {smallest}" + (" (0: none)" if smallest == 0 else "")
        raise ConfigError(f"{config.origin(key)}: {key} must be {rule} or `all` (got {value!r})")


def _validate_pair_counts(config: RecipeConfig) -> None:
    """Pair counts, a dataset's own validation and test splits, and the shape of a mixture: whatever the data itself
    cannot change (how many pairs it holds is checked when it is read)."""
    data, origin = config.data, config.origin
    _check_count(config, "data.num_pairs", data.num_pairs, 2)
    _check_count(config, "data.num_test_pairs", data.num_test_pairs, 0)
    own_val = data.val_split is not None or data.val_source is not None
    if isinstance(data.num_pairs, int) and not own_val and max(1, round(data.num_pairs * data.val_fraction)) >= data.num_pairs:
        # The validation split takes max(1, round(num_pairs * val_fraction)) pairs; training needs the rest.
        raise ConfigError(
            f"{origin('data.val_fraction')}: data.val_fraction leaves no training pairs out of data.num_pairs = "
            f"{data.num_pairs} (got {data.val_fraction})"
        )
    if data.source == "synthetic" and ALL_PAIRS in (data.num_pairs, data.num_test_pairs) and data.mixture is None:
        key = "data.num_pairs" if data.num_pairs == ALL_PAIRS else "data.num_test_pairs"
        raise ConfigError(f"{origin(key)}: {key} must be a number for data.source synthetic, which makes as many pairs as asked")
    if data.val_split is not None and data.val_source is None and data.mixture is not None:
        raise ConfigError(
            f"{origin('data.val_split')}: data.val_split names a split of data.source, which a mixture has not: "
            "give the validation source as data.val_source (with data.val_split its split, if it is a dataset)"
        )
    if data.mixture is None:
        return
    defaults = DataConfig()
    for key in ("source", "subset", "config_name", "train_split", "num_pairs"):
        if getattr(data, key) != getattr(defaults, key):
            raise ConfigError(
                f"{origin('data.' + key)}: data.{key} ({getattr(data, key)!r}) and data.mixture are both set: each "
                f"entry of a mixture names its own source, split and fraction or num_pairs; remove data.{key} (or, over a "
                f"base file that sets it, set it to {getattr(defaults, key)!r})"
            )
    if not data.mixture:
        raise ConfigError(f"{origin('data.mixture')}: data.mixture must list at least one source, or be null")
    if data.test_source is None and data.num_test_pairs not in (0, ALL_PAIRS):
        raise ConfigError(
            f"{origin('data.num_test_pairs')}: data.num_test_pairs = {data.num_test_pairs} but a mixture's test pairs "
            "come from data.test_source, which is not set: name one, or set data.num_test_pairs: 0"
        )
    for i, entry in enumerate(data.mixture):
        key = f"data.mixture[{i}]"
        where = f"{origin('data.mixture')}: {key} ({entry.source or 'no source'})"
        if not entry.source:
            raise ConfigError(f"{where}: source must name a hub dataset, a dataset directory or a local file")
        if (entry.fraction is None) == (entry.num_pairs is None):
            raise ConfigError(f"{where}: give one of fraction (of its usable pairs) or num_pairs (a number or `all`)")
        if entry.fraction is not None and not 0 < entry.fraction <= 1:
            raise ConfigError(f"{where}: fraction must be in (0, 1] (got {entry.fraction})")
        if entry.num_pairs is not None:
            _check_count(config, f"{key}.num_pairs", entry.num_pairs, 1)
        if entry.source == "synthetic" and not isinstance(entry.num_pairs, int):
            raise ConfigError(f"{where}: give num_pairs a number: synthetic makes as many pairs as asked")
        if (entry.format or data.format) not in DATA_FORMATS:
            raise ConfigError(f"{where}: format must be one of {', '.join(DATA_FORMATS)} (got {entry.format!r})")
    conflict = mixture_format_conflict([(entry.source, entry.format or data.format) for entry in data.mixture])
    if conflict:
        raise ConfigError(f"{origin('data.mixture')}: {conflict}")


# Formats rendered as plain text; the others are messages, rendered with the chat template.
def _get(obj: Any, keys: list[str]) -> Any:
    for key in keys:
        obj = getattr(obj, key)
    return obj


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RecipeConfig:
    """Load a YAML run file (with its `base` chain), apply `key=value` overrides, and validate."""
    path = Path(path)
    data = _load_with_bases(path)
    where = {"": str(path)}
    for override in overrides or []:
        keys, value = _parse_override(override)
        target = data
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[keys[-1]] = value
        where[".".join(keys)] = f"--set {override.strip()}"
    config = _build(RecipeConfig, data, where)
    config.source_file = str(path)
    config.overrides = {key: flag for key, flag in where.items() if key}
    if config.model.tiny is not None and config.model.name_or_path is not None:
        config.model.tokenizer = config.model.tokenizer or config.model.name_or_path
        config.model.name_or_path = None
    if config.loss.type == "sigmoid" and config.loss.label_smoothing:  # then not the same loss as our dpo
        raise ConfigError(
            f"{config.origin('loss.type')}: loss.type sigmoid is TRL 1.16's plain DPO loss, which ignores "
            f"loss.label_smoothing ({config.loss.label_smoothing}): for conservative DPO set loss.type: cdpo"
        )
    config.loss.type = TRL_LOSS_NAMES.get(config.loss.type, config.loss.type)
    if config.training.prompt_sharing is None and config.model.attn_implementation not in SHARED_PROMPT_ATTENTION:
        config.training.prompt_sharing = False  # "auto" on any device: this attention cannot read the shared mask
    _validate(config)
    return config
