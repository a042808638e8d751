"""Typed run configuration: YAML files over a shared base, command-line overrides, validation.

A run file names its base with `base: base.yaml` (relative to the file) and holds only what differs.
Every problem is raised as `ConfigError` with the file and the dotted key, so the CLI can print one line.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")


class ConfigError(ValueError):
    """A configuration problem, worded as one line that names the file and the key."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # `all-linear`: every linear layer but the output head, in any architecture (GPT-2's Conv1D projections too);
    # or a list of module names, for example [q_proj, v_proj].
    target_modules: str | list[str] = "all-linear"
    # DoRA: the update is split into a magnitude and a direction (PEFT `use_dora`).
    use_dora: bool = False
    # rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, which keeps high ranks learning.
    use_rslora: bool = False
    # Modules trained in full and saved beside the adapter, for example [lm_head] after adding tokens.
    modules_to_save: list[str] | None = None


@dataclass
class QuantizationConfig:
    """QLoRA: the base model loaded in 4 or 8 bits through bitsandbytes (`pip install -e ".[qlora]"`), frozen, with a
    LoRA adapter trained on top."""

    bits: int = 4
    # 4-bit only: NF4 (normal-float, the QLoRA paper's) or FP4.
    quant_type: str = "nf4"
    # 4-bit only: quantize the quantization constants too (about 0.4 bits per parameter less).
    double_quant: bool = True
    # The dtype 4-bit layers compute in. auto: bf16 on a GPU that supports it, fp32 otherwise.
    compute_dtype: str = "auto"


@dataclass
class ModelConfig:
    # A hub id or a local model directory. With `tiny` there is no such model: loading makes this null (a name
    # given anyway moves to `tokenizer`, the only thing it chose), so a run's config.yaml never names a model it
    # did not train.
    name_or_path: str | None = "gpt2"
    # A hub id or directory; null means the model's own. `local-bpe` trains a byte-level BPE on the training text.
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 512
    # GPT2Config keyword arguments for a randomly initialised model built locally (nothing is downloaded).
    tiny: dict[str, Any] | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    # The dtype weights are loaded and trained in (master weights and optimizer state included); training.precision
    # is autocast on top. auto: the checkpoint's own dtype on a GPU, fp32 on CPU (and for a `tiny` model).
    dtype: str = "auto"
    # A hub model's branch, tag or commit (model and tokenizer); null: the default branch.
    revision: str | None = None
    lora: LoraConfig | None = None
    quantization: QuantizationConfig | None = None


# `data.num_pairs: all` / `data.num_test_pairs: all`: every usable pair.
ALL_PAIRS = "all"


@dataclass
class MixtureSource:
    """One entry of `data.mixture`: a source read like `data.source`, contributing a `fraction` of its usable pairs
    or `num_pairs` of them (a number or `all`) to the train + validation pool."""

    source: str = ""
    subset: str | None = None
    config_name: str | None = None
    split: str = "train"
    # null: data.format.
    format: str | None = None
    fraction: float | None = None
    num_pairs: int | str | None = None


@dataclass
class DataConfig:
    # A hub dataset id, a local directory laid out like one, a local .jsonl / .json / .parquet / .csv file (.gz
    # where it applies), or `synthetic` (hh-rlhf-format dialogues made in code).
    source: str = "Anthropic/hh-rlhf"
    # Hub (or local dataset directory) `data_dir`, for example `harmless-base`; null uses the whole dataset.
    subset: str | None = None
    # A hub dataset's configuration, `load_dataset(source, config_name)` (TRL's `dataset_config`), for example `en`;
    # null: its default. A local directory declares configurations in its README.md, as on the hub.
    config_name: str | None = None
    # One of DATA_FORMATS; `auto` detects it from the first row's columns (see `dpo_recipe.sources`).
    format: str = "auto"
    # A Jinja chat template, or a file holding one, for message formats when the tokenizer has none (or to replace
    # its own).
    chat_template: str | None = None
    # Test pairs come from this split of a hub dataset; a local file may name a separate test file here. Without
    # either (a file source), they are carved from data.source. test_split null: a dataset without a test split.
    test_source: str | None = None
    train_split: str = "train"
    test_split: str | None = "test"
    # Validation pairs from a split of data.source (a hub dataset or dataset directory), or from a source of their own
    # (a file, or a dataset with val_split), all of their usable pairs; null for both: val_fraction of train + val.
    val_split: str | None = None
    val_source: str | None = None
    # Pairs for train + val, sampled with the seed: a number, or `all` (every usable pair, less any test pairs carved
    # from the same file). num_test_pairs: a number, `all`, or 0 for no test pairs.
    num_pairs: int | str = ALL_PAIRS
    val_fraction: float = 0.1
    num_test_pairs: int | str = ALL_PAIRS
    # Several sources as the train + val pool (a list of MixtureSource), instead of data.source / train_split /
    # num_pairs; each names `fraction` or `num_pairs`. Test pairs still come from test_source (or none).
    mixture: list[MixtureSource] | None = None

    def describe(self) -> str:
        """The train + val data in words, for reports and model cards."""
        if self.mixture is None:
            return self.source + (f" ({self.subset})" if self.subset else "")
        return " + ".join(
            entry.source + (f" ({entry.subset})" if entry.subset else "")
            + (f" (fraction {entry.fraction:g})" if entry.fraction is not None else f" ({entry.num_pairs} pairs)")
            for entry in self.mixture
        )
    max_length: int = 256
    # The prompt keeps at least this many of its last tokens; only longer responses are cut from the right.
    min_prompt_tokens: int = 16
    strict: bool = False
    # Processes that tokenize (forked; the result is the same on any number). null: one per 2000 pairs, up to the
    # usable cores (and 8).
    num_proc: int | None = None
    # Keep the tokenized splits on disk (in training.reference_cache_dir/prepared), keyed by everything that makes
    # them: a second run of the same data, tokenizer and code reads them back instead of preparing (hub datasets are
    # not cached: their revision can change under the same name).
    cache: bool = True


@dataclass
class TrainingConfig:
    output_dir: str = "checkpoints"
    num_epochs: int = 5
    learning_rate: float = 1e-4
    effective_batch_size: int = 16
    per_device_batch_size: int = 16
    # Pairs per forward-only batch (reference pass, evaluation). null: 32 on every device, the recipe's value from
    # before the GPU work. A larger GPU batch is untested: no GPU run has measured one (`make bench` on the 2-core CPU
    # ran 16 faster than 32, so it passes 16).
    eval_batch_size: int | None = None
    lr_scheduler: str = "linear"
    # Keyword arguments of the scheduler, for example {num_cycles: 2} for cosine_with_restarts.
    lr_scheduler_kwargs: dict[str, Any] | None = None
    warmup_ratio: float = 0.0
    # Warmup as a number of optimizer steps (instead of warmup_ratio).
    warmup_steps: int = 0
    # transformers' optimizer name (see OPTIMIZERS); null: adamw_torch_fused on a GPU, adamw_torch on CPU.
    optim: str | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    # auto: bf16 on a GPU that supports it, fp32 otherwise (bf16 matmuls on CPU are hundreds of times slower).
    precision: str = "auto"
    gradient_checkpointing: bool = False
    # torch.compile the model (inductor, shapes dynamic from the first batch). null: off on every device. No GPU has
    # run the compiled path faster end to end yet (on an H100 it hit dynamo's recompile limit inside TRL's log-prob
    # kernel, ../shared/gpu/h100-2026-11-26.md); scripts/gpu_check.sh measures it against the uncompiled run. On the
    # 2-core CPU a compiled smoke step took 0.70-0.81x an eager one, but compiling took 71-75 s against an eager epoch
    # of 1.7-2.9 s (benchmarks/results.md). A failed compilation falls back to eager for the run, and says so.
    torch_compile: bool | None = None
    # torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs. Only
    # `default` has ever run.
    compile_mode: str = "default"
    group_by_length: bool = True
    # One row per pair with the prompt computed once (true), or TRL's two rows per pair (false). null: shared on CPU,
    # where it saves 31% of hh-rlhf tokens and trains 3.9x as fast as plain TRL (make bench, benchmarks/results.md);
    # TRL's separate rows on a GPU, where they ran faster end to end (epoch 1: 44.7k against 35.4k tokens/s on an
    # H100, ../shared/gpu/h100-2026-11-26.md; and the recipe with shared rows ran 0.32x plain TRL on an H200,
    # benchmarks/gpu_h200.md).
    prompt_sharing: bool | None = None
    # Row widths and scored-position counts padded to this many buckets, drawn from the data's length quantiles, with
    # batches formed within a bucket: a few shapes, so whatever is built per shape (attention plans, CUDA graphs) is
    # built once per bucket. null: off (0) on every device: never measured on a GPU (scripts/gpu_check.sh can, with
    # GPU_CHECK_VARIANTS).
    length_buckets: int | None = None
    # Batch width rounded up to a multiple of this. null: exact widths on every device, as TRL pads. With shared prompts
    # on a GPU, a new width cost ~0.3 s of cuDNN attention planning (H200, benchmarks/gpu_h200.md), so 64 may pay
    # there. Rounding has not been measured end to end, and separate rows (the GPU default) ran their first pass over
    # the shapes at 115 ms a step against shared rows' 386 ms there.
    pad_to_multiple_of: int | None = None
    reference_cache_dir: str = ".cache/reference_logps"
    best_metric: str = "loss"
    # Stop after this many optimizer steps (the partial last epoch is evaluated and saved); null: num_epochs decides.
    max_steps: int | None = None
    # Also validate every this many optimizer steps (into metrics.jsonl and the plots); null: at epoch ends only.
    eval_steps: int | None = None
    # Also save a `step-<N>/` checkpoint every this many optimizer steps inside an epoch (epoch ends save `epoch-<k>/`
    # anyway); `--resume` continues from the newest checkpoint of either kind, exactly. With eval_steps it must be a
    # multiple of eval_steps: every step checkpoint is then validated and can be the best one. null: epoch ends only.
    save_steps: int | None = None
    # Every epoch's weights (`all`), or only the best and the newest (`best_and_last`). Optimizer state, which only
    # resuming reads and which is twice the weights, is kept in the newest checkpoint (epoch or step) alone either way.
    keep_epochs: str = "all"
    # How many `step-<N>/` checkpoints stay: the newest N, plus the best one if it is a step checkpoint. Epoch
    # checkpoints are governed by keep_epochs alone and never count here; neither key ever deletes the best
    # checkpoint or the newest one (the one --resume reads). null: every step checkpoint stays.
    keep_checkpoints: int | None = None
    # SIGTERM or SIGUSR1 (schedulers send it ahead of a time limit, spot instances SIGTERM) saves a step checkpoint at
    # the end of the current step, then stops (exit 75 with the resume command), so --resume loses at most that step.
    # In an epoch's last step it lets the epoch end validate and save instead. false: a signal stops without saving.
    save_on_signal: bool = False
    # Stop once validation (at epoch ends, by best_metric) has not improved for this many epochs; null: never.
    early_stopping_patience: int | None = None
    logging_steps: int = 10
    dataloader_num_workers: int = 0
    # Start over when the run directory already holds checkpoints: the directory is removed first (or --overwrite).
    overwrite: bool = False


@dataclass
class LossConfig:
    # dpo, ipo, hinge, robust (TRL's definitions; TRL's name `sigmoid` is read as dpo), cdpo (conservative DPO, not
    # in TRL 1.16), or a dotted path
    # `package.module:function` with dpo_loss's signature.
    type: str = "dpo"
    beta: float = 0.1
    # The assumed rate of flipped labels, for cdpo and robust (and dpo, which it turns into cdpo).
    label_smoothing: float = 0.0
    # RPO: adds this times each chosen response's per-token NLL to its pair's loss (see loss.with_chosen_nll).
    rpo_alpha: float | None = None


# Trackers a run can report to: metrics.jsonl is always written (it is the run's own record); tensorboard writes
# event files under <run>/tensorboard; wandb logs a run (offline by default, see wandb_mode).
REPORT_TARGETS = ("jsonl", "tensorboard", "wandb")


@dataclass
class LoggingConfig:
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    wandb_mode: str = "offline"
    wandb_project: str = "dpo-recipe"


@dataclass
class RecipeConfig:
    run_name: str = "dpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Where the config came from, for error messages; not YAML keys.
    source_file: str = field(default="<defaults>", repr=False, compare=False)
    # Dotted key -> the `--set key=value` text that set it (or set a mapping above it).
    overrides: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.training.output_dir) / self.run_name

    def origin(self, key: str) -> str:
        """Where a dotted key's value came from: the `--set` flag that set it, else the config file."""
        return _origin(self.overrides, key, self.source_file)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_file")
        data.pop("overrides")
        return data

    def to_yaml(self) -> str:
        # A comment, so the file stays a plain loadable config (a run's config.yaml is what resume and eval load).
        header = f"# model: {describe_model(self.model)}\n"
        return redact_secrets(header + yaml.safe_dump(self.to_dict(), sort_keys=False))


def _origin(overrides: dict[str, str], key: str, file: str) -> str:
    parts = key.split("[")[0].split(".")
    for end in range(len(parts), 0, -1):
        flag = overrides.get(".".join(parts[:end]))
        if flag is not None:
            return flag
    return file


def looks_like_local_path(name: str) -> bool:
    """A directory rather than a hub id (`name` or `org/name`): it exists, or it is written as a path."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def describe_model(model: ModelConfig) -> str:
    """What a run trains, in words: a hub id, a local directory, or a GPT-2 built from its config."""
    if model.tiny is not None:
        shape = ", ".join(f"{key}={value}" for key, value in model.tiny.items())
        return f"GPT-2 from config, random init ({shape})"
    name = model.name_or_path or "<none>"
    if looks_like_local_path(name):
        return f"local model {Path(name).expanduser().resolve()}"
    return name


DATA_FORMATS = (
    "auto", "hh-rlhf", "hh-rlhf-chat", "standard", "standard_implicit", "conversational", "conversational_implicit",
)  # fmt: skip
# training.optim values, each with the package it needs beyond the recipe's own dependencies (and the extra that
# installs it).
OPTIMIZERS = {
    "adamw_torch": None, "adamw_torch_fused": None, "adafactor": None,
    "adamw_8bit": "bitsandbytes", "paged_adamw_8bit": "bitsandbytes", "lion_8bit": "bitsandbytes",
}  # fmt: skip
CHOICES = {
    "data.format": DATA_FORMATS,
    "training.precision": ("auto", "bf16", "fp32", "fp16"),
    "training.lr_scheduler": (
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt",
        "cosine_with_min_lr", "warmup_stable_decay",
    ),
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "training.best_metric": ("loss", "accuracy", "margin"),
    "training.keep_epochs": ("all", "best_and_last"),
    "training.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "logging.wandb_mode": ("online", "offline", "disabled"),
}


# The built-in losses (`dpo_recipe.loss.BUILTIN_LOSSES`); any other loss.type is a dotted path to a function.
LOSS_TYPES = ("dpo", "cdpo", "ipo", "hinge", "robust")
# TRL 1.16's `loss_type` names for the same losses, read as ours so that config.yaml, reports and --resume see one
# name. TRL's hinge, ipo and robust already carry ours; its other losses are not built in.
TRL_LOSS_NAMES = {"sigmoid": "dpo"}


def _dotted_path(name: str) -> tuple[str, str] | None:
    """(module, function) of `package.module:function` or `package.module.function`; None for anything else."""
    module, sep, attribute = name.rpartition(":") if ":" in name else name.rpartition(".")
    return (module, attribute) if sep and module and attribute else None


def import_loss_function(name: str):
    """The function a dotted-path loss.type names; ValueError saying why when it cannot be had."""
    import importlib

    path = _dotted_path(name)
    if path is None:
        raise ValueError(f"loss.type {name!r} is not one of {', '.join(LOSS_TYPES)} nor a dotted path module:function")
    try:
        function = getattr(importlib.import_module(path[0]), path[1])
    except (ImportError, AttributeError) as error:
        raise ValueError(f"loss.type {name!r} could not be imported: {error}") from None
    if not callable(function):
        raise ValueError(f"loss.type {name!r} is not callable")
    return function


def check_loss_import(config: RecipeConfig) -> None:
    """A loss.type of your own imports and is callable; if not, a ConfigError naming the flag or file that gave it.

    Not part of `load_config`, which also reads saved run configs for `report`, which computes no loss: a run trained
    with a module that is not importable here still reports. Training, scoring and print-config call this.
    """
    if config.loss.type in LOSS_TYPES:
        return
    try:
        import_loss_function(config.loss.type)
    except ValueError as error:
        raise ConfigError(f"{config.origin('loss.type')}: {error}") from None


# Attention implementations that read the shared-prompt layout's 4D mask (see `packing.SHARED_PROMPT_MASKS`).
SHARED_PROMPT_ATTENTION = ("sdpa", "eager")


def redact_secrets(text: str) -> str:
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{name} redacted>")
    return text


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
    file = _origin(where, key, where[""])
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
            raise ConfigError(f"{_origin(where, dotted, where[''])}: unknown key '{dotted}' (allowed here: {', '.join(fields)})")
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
    if config.loss.type not in LOSS_TYPES and _dotted_path(config.loss.type) is None:
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
                f"entry of a mixture names its own source, split and fraction or num_pairs; remove data.{key}"
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
TEXT_FORMATS = ("hh-rlhf", "standard", "standard_implicit")


def mixture_format_conflict(formats: list[tuple[str, str]]) -> str | None:
    """Why the (source, format) entries of a mixture cannot be rendered by one tokenizer, or None: text formats are
    rendered as text, message formats with the chat template; `auto` is not known yet."""
    first: dict[bool, tuple[int, str]] = {}  # is text -> (index, format) of the first entry of that kind
    for index, (source, data_format) in enumerate(formats):
        if data_format == "auto":
            continue
        text = data_format in TEXT_FORMATS
        if (not text) in first:
            other, other_format = first[not text]
            return (
                f"data.mixture[{index}] ({source}): format {data_format} cannot be mixed with {other_format} "
                f"{'messages' if text else 'text'} of data.mixture[{other}]"
            )
        first.setdefault(text, (index, data_format))
    return None


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
