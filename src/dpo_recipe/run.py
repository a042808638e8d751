"""One training run from a config: data, tokenizer, model and trainer set up (`prepare_run`), then trained to
epoch (and step) checkpoints, with the session recorded and the plots drawn (`run_training`)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import PrinterCallback
from transformers.integrations import TensorBoardCallback
from trl import DPOConfig

from .callbacks import (
    EpochEarlyStopping,
    EpochRecorder,
    InterruptGuard,
    LogLinePrinter,
    ShardReport,
    StepCheckpoints,
    StepEvaluation,
    early_stop_line,
)
from .config import OPTIMIZERS, ConfigError, LoggingConfig, RecipeConfig, check_loss_import
from .curves import plot_run
from .loss import resolve_loss
from .models import build_model, peft_config_for, resolve_precision
from .packing import device_default, epoch_padding, forward_batch_size, make_collator, on_gpu
from .prepared import prepare_run_data
from .rundir import (
    BEST_FILE,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    TENSORBOARD_DIR,
    TRAINER_STATE_FILE,
    all_checkpoints,
    atomic_write,
    best_label,
    checkpoint_epoch,
    checkpoint_step,
    check_resumed_config,
    forget_records_after,
    latest_checkpoint,
    record_config_changes,
    reference_dir,
    scoring_settings,
    trained_format,
    write_best,
)
from .totals import RunningTotals
from .trainer import RecipeDPOTrainer, fsdp_requested, parallelism


def batch_plan(config: RecipeConfig, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, gradient-accumulation steps) that give exactly the effective batch."""
    effective = config.training.effective_batch_size
    if effective % world_size:
        raise ConfigError(
            f"{config.origin('training.effective_batch_size')}: training.effective_batch_size {effective} is not "
            f"divisible by {world_size} processes"
        )
    micro = min(config.training.per_device_batch_size, effective // world_size)
    while (effective // world_size) % micro:
        micro -= 1
    return micro, effective // (world_size * micro)


# transformers renamed gradient checkpointing to activation checkpointing; use whichever this version knows.
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__ else "gradient_checkpointing"
)


def optimizer_name(config: RecipeConfig) -> str:
    """transformers' name for `training.optim`, once the package it needs is known to be installed."""
    name = config.training.optim
    if name is None:
        # Fused AdamW needs the optimizer's tensors on an accelerator to pay off; plain AdamW elsewhere.
        return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"
    package = OPTIMIZERS[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"{config.origin('training.optim')}: training.optim {name} needs {package}, which is not installed: "
            f"pip install -e \".[qlora]\""
        )
    return name


def dpo_arguments(config: RecipeConfig, world_size: int, precision: str) -> DPOConfig:
    micro, accumulation = batch_plan(config, world_size)
    training = config.training
    report_to = [target for target in config.logging.report_to if target != "jsonl"]  # metrics.jsonl is ours
    forward_batch = forward_batch_size(training.eval_batch_size)
    compile_model = device_default("torch_compile", training.torch_compile)
    return DPOConfig(
        output_dir=str(config.run_dir),
        run_name=config.run_name,
        num_train_epochs=training.num_epochs,
        max_steps=training.max_steps or -1,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=forward_batch,
        lr_scheduler_type=training.lr_scheduler,
        lr_scheduler_kwargs=training.lr_scheduler_kwargs or {},
        # transformers reads a warmup_steps below 1 as a ratio of the run's steps.
        warmup_steps=training.warmup_steps or training.warmup_ratio,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        data_seed=training.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim=optimizer_name(config),
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_epsilon=training.adam_epsilon,
        use_cpu=not torch.cuda.is_available(),
        # On a GPU, batches are copied from pinned memory without making the host wait for the copy.
        dataloader_pin_memory=on_gpu(),
        accelerator_config={"non_blocking": on_gpu()},
        # Every trainable parameter takes part in every forward (the reference pass is precomputed and frozen weights
        # are not tracked), so DDP need not search the graph for unused ones each step; transformers' default (True
        # without checkpointing) costs that search and a warning from every process.
        ddp_find_unused_parameters=False,
        # transformers' own nan filter reads every step's loss on the host; the divergence guard reads at log steps.
        logging_nan_inf_filter=False,
        **{CHECKPOINTING_ARGUMENT: training.gradient_checkpointing},
        torch_compile=compile_model,
        torch_compile_mode=training.compile_mode if compile_model else None,
        # No metric_for_best_model: `best.json` (rundir.best_epoch) is the one notion of "best", early stopping's too.
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_steps=training.logging_steps,
        report_to=report_to,
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        length_column_name="length",
        dataloader_num_workers=training.dataloader_num_workers,
        prediction_loss_only=True,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=forward_batch,
        beta=config.loss.beta,
        max_length=None,  # truncation already happened, without dropping pairs
        disable_tqdm=not sys.stderr.isatty(),
    )


@dataclass
class PreparedRun:
    trainer: RecipeDPOTrainer
    guard: InterruptGuard
    resume_from: Path | None
    early_stopping: EpochEarlyStopping | None = None


class AlreadyStopped(Exception):
    """`--resume` of a run that early stopping ended, with nothing raised that would let it go on: not an error."""


def check_not_early_stopped(run_dir: Path, checkpoint: Path, config: RecipeConfig) -> None:
    """Raise AlreadyStopped when early stopping ended the run at `checkpoint` and neither training.num_epochs nor
    the patience (or switching it off) gives it more epochs now."""
    info = run_dir / RUN_INFO_FILE
    stopped = json.loads(info.read_text()).get("early_stopped") if info.is_file() else None
    if not stopped or stopped["epoch"] != checkpoint_epoch(checkpoint):
        return
    patience = config.training.early_stopping_patience
    if config.training.num_epochs > stopped["num_epochs"] or not patience or patience > stopped["patience"]:
        return
    raise AlreadyStopped(
        f"nothing to resume: {early_stop_line(stopped)}. Raise training.num_epochs (was {stopped['num_epochs']}) or "
        f"training.early_stopping_patience (was {stopped['patience']}) to train on"
    )


# The exit code of a run that a signal stopped after saving a checkpoint (under training.save_on_signal): sysexits'
# EX_TEMPFAIL, "try again later", which is what --resume does. A stop without a save exits 130.
EXIT_SAVED_ON_SIGNAL = 75


def _completed_epochs(checkpoint: Path) -> int:
    """The epochs a checkpoint's run had finished (or, for a `training.max_steps` epoch checkpoint, was in)."""
    epoch = checkpoint_epoch(checkpoint)
    return epoch if epoch is not None else int(json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["epoch"])


def resume_command(run_dir: Path) -> str:
    """The command that resumes this run, launched the way this one was, by this environment's own programs: a bare
    `python` is whichever interpreter a shell finds first, often one without the recipe installed."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by `accelerate launch` in every process it starts
        accelerate = Path(sys.executable).with_name("accelerate")
        launcher = [str(accelerate), "launch"] if accelerate.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
    else:
        launcher = [sys.executable]
    entry = [sys.argv[0]] if sys.argv[0].endswith("train.py") else ["-m", "dpo_recipe", "train"]
    # The run directory's config.yaml is the resolved config, --set overrides included.
    return shlex.join([*launcher, *entry, "--config", str(run_dir / RUN_CONFIG_FILE)])


def prepare_run(config: RecipeConfig, resume: bool = False, verbose: bool = False) -> PreparedRun:
    """Everything up to the first step: data, tokenizer, model, reference log-probs, and the trainer."""
    # Without a GPU, processes started by `accelerate launch` join one gloo group (MULTI_CPU) instead of each
    # training alone; under an FSDP launch config the trainer then shards over it (`_fsdp_over_gloo`).
    state = PartialState(cpu=not torch.cuda.is_available())
    precision = resolve_precision(config.training.precision, config.origin("training.precision"))
    check_loss_import(config)  # before any data or model work, so a typo in loss.type costs nothing
    loss_fn = resolve_loss(config.loss.type, config.loss.label_smoothing, config.loss.rpo_alpha)
    if config.model.lora is not None and fsdp_requested():
        raise ConfigError(
            f"{config.origin('model.lora')}: model.lora is not supported under FSDP (an adapter's model fits each "
            "device: launch with multi_gpu.yaml)"
        )
    run_dir = config.run_dir
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise ConfigError(f"--resume: no complete checkpoint in {run_dir}")
        resumed_changes = check_resumed_config(config)
        check_not_early_stopped(run_dir, resume_from, config)
        print(f"resuming {run_dir} from {resume_from.name} (step {checkpoint_step(resume_from)})", flush=True)
    elif config.training.overwrite:  # every process takes this branch, so the barrier below is always matched
        if state.is_main_process and run_dir.is_dir():
            print(f"overwrite: removing {run_dir}", flush=True)
            shutil.rmtree(run_dir)
        state.wait_for_everyone()
    elif all_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints: add --resume to continue that run, or --overwrite to start over")

    tokenizer_source = str(resume_from) if resume_from is not None else None
    # The main process prepares the data (and trains a local BPE) or reads them from the cache; the others then read.
    tokenizer, data, cache_note = prepare_run_data(config, tokenizer_source, state.main_process_first)
    report = data.report
    model = build_model(config.model, tokenizer, config.training.seed, config.data.max_length)
    lora = config.model.lora  # checked before the run directory is made
    peft_config = None if lora is None else peft_config_for(model, lora, config.origin("model.lora.target_modules"))
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        data.write(run_dir)
        # Starting over is what this launch did, not a setting of the run: its saved config, which the printed resume
        # command and `eval` read, must never wipe the run when used again.
        saved = copy.deepcopy(config)
        saved.training.overwrite = False
        atomic_write(run_dir / RUN_CONFIG_FILE, saved.to_yaml())
        print("\n".join([*report.summary_lines(), cache_note]), flush=True)
        if config.model.tiny is not None and not reference_dir(run_dir).exists():
            model.save_pretrained(reference_dir(run_dir))
            tokenizer.save_pretrained(reference_dir(run_dir))
        if resume_from is not None:
            forget_records_after(run_dir, checkpoint_step(resume_from))
            write_best(run_dir, config.training.best_metric)
            record_config_changes(run_dir, resumed_changes, checkpoint_step(resume_from), _completed_epochs(resume_from))
    state.wait_for_everyone()

    micro, _ = batch_plan(config, state.num_processes)
    training = config.training
    collator = make_collator(
        tokenizer.pad_token_id, training.prompt_sharing, training.pad_to_multiple_of, training.length_buckets,
        (data.train, data.val), micro,
    )
    totals = RunningTotals()
    guard = InterruptGuard(save_on_signal=training.save_on_signal)
    trainer = RecipeDPOTrainer(
        model=model,
        args=dpo_arguments(config, state.num_processes, precision),
        data_collator=collator,
        train_dataset=data.train,
        eval_dataset=data.val,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            EpochRecorder(run_dir, totals, training.best_metric, training.keep_epochs, training.keep_checkpoints),
            guard,
            ShardReport(),
        ],
        loss_fn=loss_fn,
        reference_cache_dir=config.training.reference_cache_dir,
        totals=totals,
        scoring=scoring_settings(config, trained_format(run_dir, config.data)),
    )
    if config.training.eval_steps:
        trainer.add_callback(StepEvaluation(config.training.eval_steps))
    if config.training.save_steps:
        trainer.add_callback(StepCheckpoints(config.training.save_steps))
    early_stopping = None
    if config.training.early_stopping_patience:
        early_stopping = EpochEarlyStopping(run_dir, config.training.best_metric, config.training.early_stopping_patience)
        trainer.add_callback(early_stopping)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:  # not under the env's choice
            callback.logging_dir = str(run_dir / TENSORBOARD_DIR)
    if not verbose and trainer.args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(LogLinePrinter())
    if state.is_main_process:
        if peft_config is not None:
            trainable, total = trainer.model.get_nb_trainable_parameters()
            print(f"LoRA: {trainable:,} trainable parameters of {total:,} ({trainable / total:.2%})", flush=True)
        micro, accumulation = batch_plan(config, state.num_processes)
        print(
            f"batch: {state.num_processes} process(es) x micro-batch {micro} x accumulation {accumulation} = "
            f"effective batch {config.training.effective_batch_size}; precision {precision}; "
            f"{parallelism(trainer.accelerator)}; {weights_line(trainer.model)}; {compile_plan(trainer)}",
            flush=True,
        )
        print(batching_line(trainer), flush=True)
        hits = ", ".join(f"{name} {'reused' if hit else 'computed'}" for name, hit in trainer.reference_cache_hits.items())
        print(f"reference log-probs: {hits} (cache {config.training.reference_cache_dir})", flush=True)
    return PreparedRun(trainer, guard, resume_from, early_stopping)


def compile_plan(trainer: RecipeDPOTrainer) -> str:
    """Whether the model is compiled, and how, for the printed plan."""
    if not trainer.args.torch_compile:
        return "model compiled: no"
    plugin = trainer.accelerator.state.dynamo_plugin
    shapes = "dynamic shapes" if plugin.dynamic else "static shapes" if plugin.dynamic is False else "automatic shapes"
    return f"model compiled: yes (torch.compile, {plugin.backend.value.lower()}, mode {plugin.mode}, {shapes})"


def weights_line(model: torch.nn.Module) -> str:
    """The dtype the trainable weights are held and updated in: what a bf16 load means for memory and precision."""
    dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    if dtype == torch.float32:
        return "weights fp32"
    return f"weights {name}: master weights, gradients and optimizer state are {name} too (no fp32 copy)"


def batching_line(trainer: RecipeDPOTrainer) -> str:
    """The layout, the shapes and the padding one epoch of training batches leaves."""
    collator = trainer.data_collator
    dataset = trainer.train_dataset
    with torch.random.fork_rng(devices=[]):  # the sampler draws from torch's RNG: training must not see this draw
        order = list(trainer._get_train_sampler(dataset))
    size = trainer.args.per_device_train_batch_size
    batches = [[dataset[i] for i in order[k : k + size]] for k in range(0, len(order), size)]
    padding = epoch_padding(collator, batches)
    if collator.buckets is None:
        shapes = "exact widths" if collator.pad_to_multiple_of in (None, 1) else f"widths rounded up to {collator.pad_to_multiple_of}"
    else:
        shapes = (f"length buckets: widths {list(collator.buckets.widths)}, scored positions per pair "
                  f"{list(collator.buckets.scored_per_pair)}")
    return (f"batches: {collator.layout.replace('_', ' ')} layout, {shapes}; padding {padding['positions']:.1%} of "
            f"positions, {padding['scored']:.1%} of scored-position slots (one epoch)")




def _record_session(run_dir: Path, run: PreparedRun, seconds: float) -> None:
    """Where and how long the run trained (each session of a resumed run adds its own), for reports to quote."""
    import platform

    import transformers
    import trl

    path = run_dir / RUN_INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() and run.resume_from is not None else {"sessions": []}
    state = run.trainer.accelerator.state
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    info["sessions"].append(
        {
            "wall_seconds": round(seconds, 1),  # data, reference pass, training, validation and saving
            "resumed_from": run.resume_from.name if run.resume_from else None,
            "device": device,
            "processes": state.num_processes,
            "distributed": str(state.distributed_type),
            "precision": "bf16" if run.trainer.args.bf16 else "fp16" if run.trainer.args.fp16 else "fp32",
            "software": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        }
    )
    info["wall_seconds"] = round(sum(session["wall_seconds"] for session in info["sessions"]), 1)
    # How the run ended, as of this session: early stopping's epoch, best epoch and patience, or absent.
    info.pop("early_stopped", None)
    if run.early_stopping is not None and run.early_stopping.stopped:
        info["early_stopped"] = run.early_stopping.stopped
    atomic_write(path, json.dumps(info, indent=2))


@contextlib.contextmanager
def wandb_environment(logging: LoggingConfig):
    """The config's wandb mode and project, as the environment variables wandb and transformers' WandbCallback read,
    for this training only: a value exported before the run wins, and the variables are put back afterwards, so a
    second run in the same process reads its own config, not the first run's."""
    values = {"WANDB_MODE": logging.wandb_mode, "WANDB_PROJECT": logging.wandb_project}
    before = {name: os.environ.get(name) for name in values}
    if "wandb" in logging.report_to:
        for name, value in values.items():
            os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_training(config: RecipeConfig, resume: bool = False, verbose: bool = False, signal_after_stop: bool = True) -> int:
    """Train one config end to end. Returns the process exit code: 0; 130 once SIGINT/SIGTERM stopped the run at a
    step's end; 75 (EXIT_SAVED_ON_SIGNAL) once SIGTERM/SIGUSR1 stopped it there after saving a checkpoint, under
    training.save_on_signal (either way its resume command printed). Only a caller that ends the process with that
    code (the command line) passes `signal_after_stop=False`; for any other the signal then goes on to the handler it would have reached
    (Ctrl-C: KeyboardInterrupt), as with `InterruptGuard`."""
    started = time.perf_counter()
    try:
        run = prepare_run(config, resume, verbose)
    except AlreadyStopped as stopped:
        if PartialState().is_main_process:
            print(stopped, flush=True)
        return 0
    run.guard.deliver_after_stop = False  # delivered below, once the stop is reported
    try:
        with wandb_environment(config.logging):
            run.trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    finally:
        run.guard.restore()  # HF skips on_train_end when training raises
    run_dir = config.run_dir
    is_main = run.trainer.accelerator.is_main_process
    if run.guard.interrupted:
        last = latest_checkpoint(run_dir)
        # The save the signal asked for, at the step training stopped at (a step checkpoint, or its epoch's).
        saved = run.guard.saved_on_signal and last is not None and checkpoint_step(last) == run.trainer.state.global_step
        if is_main:
            plot_run(run_dir)  # the steps logged since the last epoch end
            command = resume_command(run_dir)
            name = signal.Signals(run.guard.stop_signal or run.guard.signal).name
            if saved:
                print(f"stopped by {name} after saving {last} (step {run.trainer.state.global_step}). Resume with: "
                      f"{command} --resume", file=sys.stderr)  # fmt: skip
            elif last:
                print(f"interrupted; last complete checkpoint: {last}. Resume with: {command} --resume", file=sys.stderr)
            else:
                print(f"interrupted before any checkpoint was saved; nothing to resume. Start again with: {command}", file=sys.stderr)
        if signal_after_stop:
            run.guard.deliver()
        return EXIT_SAVED_ON_SIGNAL if saved else 130
    if is_main:
        _record_session(run_dir, run, time.perf_counter() - started)
        best = json.loads((run_dir / BEST_FILE).read_text()) if (run_dir / BEST_FILE).exists() else None
        if best:
            print(f"done: {run_dir} (best {best_label(best)} by {best['metric']} = {best['value']:.4f})", flush=True)
    return 0
