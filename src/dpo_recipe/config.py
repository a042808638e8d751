"""Typed run configuration: every setting a run has, its default and what it means, and the names it may take.

Reading a config file (bases, `--set` overrides, types, checks) is `dpo_recipe.config_loader`.
"""

from __future__ import annotations

import dataclasses
import os
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
        return key_origin(self.overrides, key, self.source_file)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_file")
        data.pop("overrides")
        return data

    def to_yaml(self) -> str:
        # A comment, so the file stays a plain loadable config (a run's config.yaml is what resume and eval load).
        header = f"# model: {describe_model(self.model)}\n"
        return redact_secrets(header + yaml.safe_dump(self.to_dict(), sort_keys=False))


def key_origin(overrides: dict[str, str], key: str, file: str) -> str:
    """The `--set` flag that set a dotted key (or a mapping above it), else the file."""
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


def loss_function_path(name: str) -> tuple[str, str] | None:
    """(module, function) of `package.module:function` or `package.module.function`; None for anything else."""
    module, sep, attribute = name.rpartition(":") if ":" in name else name.rpartition(".")
    return (module, attribute) if sep and module and attribute else None


def import_loss_function(name: str):
    """The function a dotted-path loss.type names; ValueError saying why when it cannot be had."""
    import importlib

    path = loss_function_path(name)
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
