"""Training: a thin `trl.DPOTrainer` subclass, epoch bookkeeping, and the run that ties config to checkpoints.

What the subclass changes, and why:
- data arrives tokenized and truncated by `dpo_recipe.data` (TRL's keep_start truncation drops whole pairs);
- batches use `packing.PairCollator`: the prompt is computed once per pair, and length grouping limits padding;
- reference log-probs are computed once and cached on disk (`reference`), so no epoch or sweep run redoes them;
- the loss is the configured pure function from `dpo_recipe.loss`;
- an FSDP launch shards on CPU too (accelerate engages FSDP on GPUs only), and FSDP epoch checkpoints also hold the
  whole model, so every command loads them as ordinary HF model directories.
Everything else (optimizer, schedule, mixed precision, DDP/FSDP/DeepSpeed, saving, resuming) is TRL/Trainer's own.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast_object_list,
    gather_object,
    is_peft_model,
    parse_flag_from_env,
)
from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import DPOConfig, DPOTrainer
from trl.models import prepare_deepspeed
from trl.trainer.utils import use_adapter

from .config import ConfigError, RecipeConfig, describe_model
from .data import load_run_data, prepare_data
from .loss import resolve_loss
from .models import build_model, model_fingerprint, resolve_precision
from .packing import (
    LengthBucketSampler,
    dataset_pair_logps,
    epoch_padding,
    forward_batch_size,
    install_scoring_head,
    make_collator,
    on_gpu,
    pair_logps,
    row_lengths,
)
from .curves import plot_run
from .reference import cache_path, cached_reference_logps, with_reference_columns
from .rundir import (
    BEST_FILE,
    BEST_LINK,
    EPOCH_PREFIX,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    TENSORBOARD_DIR,
    append_record,
    apply_retention,
    atomic_write,
    epoch_dirs,
    forget_epochs_after,
    latest_checkpoint,
    reference_dir,
    write_best,
)

class DivergenceError(RuntimeError):
    """The loss became nan or inf. Raised at the next read of the step statistics, which comes before any save."""


# Per-pair values gathered each step and summed; keeping sums (not per-batch means) makes every logged mean exact.
STAT_NAMES = ("loss", "chosen_reward", "rejected_reward", "wins", "ties", "pairs", "tokens", "logps_chosen", "logps_rejected")
# What each stat is logged as (TRL's names), besides the loss.
LOGGED_MEANS = {
    "rewards/chosen": "chosen_reward",
    "rewards/rejected": "rejected_reward",
    "rewards/margins": "margin",
    "rewards/accuracies": "accuracy",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
}


@dataclass
class RunningTotals:
    """Sums per window: `train` (the epoch so far), `eval` (the current evaluation), `log` (since the last log line).

    Each step's sums arrive as a tensor on the device (`record`) and are read to the host, all at once, only when
    something reads a window (`means`, `flush`): a read in every step would make the host wait for the device every
    step. The read is also where divergence is caught: the first non-finite step raises `DivergenceError`, naming
    it. Every save reads first (`RecipeDPOTrainer._save_checkpoint`), so no update after a bad step is ever saved.
    """

    sums: dict[str, dict[str, float]] = field(default_factory=lambda: {"train": {}, "eval": {}, "log": {}})
    # (windows, where, sums on the device) per step not read yet
    pending: list[tuple[tuple[str, ...], str, torch.Tensor]] = field(default_factory=list)

    def reset(self, window: str) -> None:
        self.flush()
        self.sums[window] = dict.fromkeys(STAT_NAMES, 0.0)

    def add(self, window: str, values: list[float]) -> None:
        totals = self.sums[window] or dict.fromkeys(STAT_NAMES, 0.0)
        for name, value in zip(STAT_NAMES, values):
            totals[name] += value
        self.sums[window] = totals

    def record(self, windows: tuple[str, ...], where: str, values: torch.Tensor) -> None:
        self.pending.append((windows, where, values))

    def flush(self) -> None:
        """Read every pending step's sums, in order, into their windows; raise at the first non-finite one."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        rows = torch.stack([values for _, _, values in pending]).tolist()  # the one wait for the device
        for (windows, where, _), values in zip(pending, rows):
            if not all(map(_finite, values[:3])):
                raise DivergenceError(f"loss became {values[0] / max(values[5], 1):g} at {where}")
            for window in windows:
                self.add(window, values)

    def means(self, window: str) -> dict[str, float]:
        self.flush()
        totals = self.sums[window] or dict.fromkeys(STAT_NAMES, 0.0)
        pairs = max(totals["pairs"], 1.0)
        chosen, rejected = totals["chosen_reward"] / pairs, totals["rejected_reward"] / pairs
        return {
            "loss": totals["loss"] / pairs,
            "chosen_reward": chosen,
            "rejected_reward": rejected,
            "margin": chosen - rejected,
            "accuracy": totals["wins"] / pairs,
            "ties": totals["ties"] / pairs,
            "logps_chosen": totals["logps_chosen"] / pairs,
            "logps_rejected": totals["logps_rejected"] / pairs,
            "pairs": int(totals["pairs"]),
            "tokens": int(totals["tokens"]),
        }


class WideLengthGroupedSampler(LengthGroupedSampler):
    """HF's length grouping with mega-batches of 50 batches whatever the dataset size, in shuffled batch order.

    HF caps a mega-batch at a quarter of the data, so a few hundred pairs are sorted 64 at a time and batches stay
    ~19% padding (measured on hh-rlhf harmless-base); 50 batches bring that near zero. Shuffling the batches of a
    mega-batch keeps HF's longest-first batch (an out-of-memory shows at step one) but no longer walks every
    mega-batch from long to short.
    """

    MEGA_BATCH_BATCHES = 50

    def __iter__(self):
        indices = get_length_grouped_indices(
            self.lengths, self.batch_size, mega_batch_mult=self.MEGA_BATCH_BATCHES, generator=self.generator
        )
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        order = torch.randperm(len(batches) - 1, generator=self.generator).add(1).tolist() if len(batches) > 1 else []
        return iter([i for b in [batches[0], *(batches[j] for j in order)] for i in b])


class RecipeDPOTrainer(DPOTrainer):
    def __init__(
        self, *args, model, loss_fn, reference_cache_dir: str, totals: RunningTotals | None = None, ref_model=None,
        model_description: str | None = None, **kwargs,
    ):
        self.loss_fn = loss_fn
        self.model_description = model_description
        self.reference_cache_dir = reference_cache_dir
        self.reference_cache_hits: dict[str, bool] = {}
        self.totals = totals or RunningTotals()
        # Hashed here, before anything is sharded (DTensors cannot be read), by the main process, whose weights are
        # the ones every rank trains from.
        self._reference_key = _main_process_value(lambda: model_fingerprint(ref_model or model))
        # Under FSDP the reference pass needs a sharded copy of the starting model; without one TRL reloads the model
        # from `_name_or_path`, which a locally built model lacks. The copy is freed once the log-probs are computed.
        copied = ref_model is None and fsdp_requested() and kwargs.get("peft_config") is None
        super().__init__(*args, model=model, ref_model=copy.deepcopy(model) if copied else ref_model, **kwargs)
        if copied:
            self.ref_model = None
        # Before accelerate prepares the model, so its mixed-precision autocast surrounds the scoring forward too.
        install_scoring_head(self.model)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
            _fsdp_over_gloo(self.accelerator)
            self.is_fsdp_enabled = True

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero() or self.model_description is None:
            return
        # TRL's card links a hub base model and a hub repo; a local or locally built model has neither, and the card
        # would say "a fine-tuned version of [None]" and load model "None".
        card = Path(self.args.output_dir) / "README.md"
        text = card.read_text().replace(
            "a fine-tuned version of [None](https://huggingface.co/None)", f"a fine-tuned version of {self.model_description}"
        )
        card.write_text(text.replace('model="None"', f'model="{Path(self.args.output_dir) / BEST_LINK}"'))

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied LM head is saved once, as the input embedding, so its key is "missing" on every resume by design.
        tied = set(getattr(self.accelerator.unwrap_model(self.model), "_tied_weights_keys", None) or ())
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized and truncated by dpo_recipe.data, without dropping pairs

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps", "length"]

    def _reference_context(self):
        if self.ref_model is None and is_peft_model(self.model):
            return use_adapter(self.accelerator.unwrap_model(self.model), adapter_name=None)
        return contextlib.nullcontext()

    def _reference_model(self):
        if self.ref_model is None and self.is_deepspeed_enabled:
            # Before `train` DeepSpeed has not placed the policy yet: TRL's inference engine places (and under
            # ZeRO-3 gathers) it, built once and reused.
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        return self.ref_model or self.model

    def _precompute_ref_logps(self, dataset, name, batch_size):
        precision = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32"
        path = cache_path(self.reference_cache_dir, self._reference_key, dataset, precision, self.data_collator.layout)
        chosen, rejected, hit = self._reference_logps_on_every_rank(path, dataset, batch_size)
        self.reference_cache_hits[name] = hit
        return with_reference_columns(dataset, chosen, rejected)

    def _reference_logps_on_every_rank(self, path: Path, dataset, batch_size: int):
        """(chosen, rejected, hit), the same on every rank: one cache file, read or written by the main process.

        The main process decides hit or miss for all. On a miss every rank scores its share of the batches with
        the same number of forwards (FSDP and ZeRO-3 forwards are collectives every rank must join), the shares
        are gathered, and the main process alone writes the file. Then its values go to every rank.
        """
        accelerator = self.accelerator
        model = self._reference_model()

        def compute():
            with self._reference_context():
                chosen, rejected = dataset_pair_logps(
                    model, dataset, self.data_collator, batch_size, accelerator.device, accelerator.autocast,
                    accelerator.process_index, accelerator.num_processes,
                )
            shares = gather_object([(chosen, rejected)])
            # Each pair was scored by exactly one rank and is nan on the others (a nan reference stays nan).
            return tuple(torch.stack(side).nanmean(0) for side in zip(*shares))

        hit = [path.is_file()] if accelerator.is_main_process else [None]
        broadcast_object_list(hit, from_process=0)
        computed = None if hit[0] else compute()
        result = [cached_reference_logps(path, lambda: computed) if accelerator.is_main_process else None]
        broadcast_object_list(result, from_process=0)
        return result[0]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        chosen_logps, rejected_logps = pair_logps(model, inputs)
        losses, chosen_rewards, rejected_rewards = self.loss_fn(
            chosen_logps, rejected_logps, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], self.beta,
            chosen_tokens=inputs["chosen_tokens"], rejected_tokens=inputs["rejected_tokens"],
        )
        loss = losses.mean()
        per_pair = torch.stack(
            [
                losses.detach(),
                chosen_rewards,
                rejected_rewards,
                chosen_rewards > rejected_rewards,
                chosen_rewards == rejected_rewards,
                torch.ones_like(losses),
                inputs["pair_tokens"],
                chosen_logps.detach(),
                rejected_logps.detach(),
            ],
            dim=1,
        ).double()
        # Per pair, not per process: gather_for_metrics drops the pairs accelerate repeats to even out the last batch
        # across processes, so each real pair counts once. The sums stay on the device until a window is read.
        stats = self.accelerator.gather_for_metrics(per_pair).sum(dim=0)
        where = f"optimizer step {self.state.global_step + 1}" if mode == "train" else "evaluation"
        windows = ("train", "log") if mode == "train" else ("eval",)
        self.totals.record(windows, f"{where} (epoch {self.state.epoch or 0:.2f})", stats)
        return (loss, None) if return_outputs else loss

    def _save_checkpoint(self, model, trial):
        self.totals.flush()  # a step that diverged since the last read raises here, before anything is written
        super()._save_checkpoint(model, trial)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self.totals.flush()
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            # With sharded state dicts Trainer writes only the shards (for resuming); the epoch model must also be an
            # ordinary HF directory that eval, rank, generate and merge load. Every rank joins the gathering.
            state_dict = self.accelerator.get_state_dict(self.model)
            # Gathered one by one, tied weights no longer share storage: keep only the one a load ties the others to.
            for tied in getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {}:
                state_dict.pop(tied, None)
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL's own `log` averages per-batch means, so a short last batch weighs as much as a full one. Per-pair
        # means over the window instead: the evaluation just run, or the training steps since the last log line.
        evaluating = any(key.startswith("eval_") for key in logs)
        window = "eval" if evaluating else "log"
        means = self.totals.means(window)
        if means["pairs"] and (evaluating or "loss" in logs):
            prefix = "eval_" if evaluating else ""
            logs[f"{prefix}loss"] = means["loss"]
            logs.update({f"{prefix}{name}": means[stat] for name, stat in LOGGED_MEANS.items()})
        if not evaluating and "loss" in logs:
            self.totals.reset("log")
        super(DPOTrainer, self).log(logs, start_time)  # transformers' Trainer.log, past TRL's averaging

    def evaluate(self, *args, **kwargs):
        self.totals.reset("eval")
        metrics = super().evaluate(*args, **kwargs)
        self.totals.flush()
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            buckets = self.data_collator.buckets
            if buckets is not None:  # batches within length buckets: each batch's width is its bucket's
                lengths = row_lengths(train_dataset or self.train_dataset, self.data_collator.share_prompt)
                return LengthBucketSampler([buckets.bucket(n) for n in lengths], sampler.batch_size, sampler.generator)
            return WideLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, generator=sampler.generator)
        return sampler

    def _get_eval_sampler(self, eval_dataset):
        # Evaluation needs no randomness, so pairs go longest first and batches pad almost nothing; HF's length
        # grouping is built for training and leaves small evaluation sets in random order.
        if self.args.world_size > 1 or "length" not in eval_dataset.column_names:
            return super()._get_eval_sampler(eval_dataset)
        lengths = eval_dataset["length"]
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (accelerate's own switch, set by an FSDP launch config)."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def _fsdp_over_gloo(accelerator) -> None:
    """Make the launcher's FSDP request real on CPU.

    accelerate 1.15 turns ACCELERATE_USE_FSDP into FSDP only on GPU-like devices; on CPU the processes would train as
    plain DDP over gloo, unsharded. FSDP2 (`fully_shard`) runs on CPU over gloo, so the state is switched the way
    accelerate's GPU branch switches it, with the plugin built from the launcher's FSDP_* variables.
    """
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _main_process_value(compute):
    """`compute()` on the main process, the same value on every process."""
    state = PartialState()
    value = [compute() if state.is_main_process else None]
    broadcast_object_list(value, from_process=0)
    return value[0]


def parallelism(accelerator) -> str:
    processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version} over {processes}, parameters sharded"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage} over {processes}"
    return f"DDP over {processes}" if accelerator.num_processes > 1 else "1 process"


class ShardReport(TrainerCallback):
    """Under FSDP, each rank says how much of the model it holds once training has sharded it."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        parameters = list(model.parameters()) if model is not None else []
        if not any(isinstance(p, DTensor) for p in parameters):
            return
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters)
        total = sum(p.numel() for p in parameters)
        print(f"rank {args.process_index}: holds {local} of {total} parameter values", flush=True)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


# training.best_metric as transformers logs it, and whether larger is better.
BEST_METRIC_LOGGED = {"loss": ("eval_loss", False), "accuracy": ("eval_rewards/accuracies", True),
                      "margin": ("eval_rewards/margins", True)}  # fmt: skip


class EpochRecorder(TrainerCallback):
    """Writes metrics.jsonl and the epoch checkpoints.

    At each logging step a `step` record; at each mid-epoch evaluation an `eval` record; at each epoch end the val
    metrics, then an atomically named checkpoint, an `epoch` record, the best epoch and checkpoint retention.
    """

    def __init__(self, run_dir: Path, totals: RunningTotals, best_metric: str, keep_epochs: str = "all"):
        self.run_dir = Path(run_dir)
        self.totals = totals
        self.best_metric = best_metric
        self.keep_epochs = keep_epochs
        self.epoch_started = 0.0
        self.train_seconds = 0.0
        self.at_epoch_end = False
        self.train_means: dict[str, float] = {}
        self.val_means: dict[str, float] = {}

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.totals.reset("train")
        self.epoch_started = time.perf_counter()
        self.at_epoch_end = False

    def on_epoch_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self.epoch_started
        self.train_means = self.totals.means("train")
        self.at_epoch_end = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs and "rewards/accuracies" in logs:
            train = {stat: logs[name] for name, stat in LOGGED_MEANS.items()}
            train.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"))
            append_record(self.run_dir, {"kind": "step", "epoch": state.epoch, "step": state.global_step, "train": train})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.val_means = self.totals.means("eval")
        if not self.at_epoch_end and state.is_world_process_zero:
            record = {"kind": "eval", "epoch": state.epoch, "step": state.global_step, "val": dict(self.val_means)}
            append_record(self.run_dir, record)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        # A run cut short by training.max_steps saves its partial last epoch under the epoch it was in.
        epoch = math.ceil(state.epoch - 1e-9)
        saved = self.run_dir / f"checkpoint-{state.global_step}"
        final = self.run_dir / f"{EPOCH_PREFIX}{epoch}"
        if final.exists():
            shutil.rmtree(final)
        seconds = max(self.train_seconds, 1e-9)
        train = dict(self.train_means)
        train["tokens_per_s"] = train.get("tokens", 0) / seconds
        train["pairs_per_s"] = train.get("pairs", 0) / seconds
        record = {"kind": "epoch", "epoch": epoch, "step": state.global_step, "train": train, "val": dict(self.val_means)}
        # The record goes first, so a committed epoch always has one; a record whose rename never happened is
        # dropped on resume (`_forget_epochs_after`).
        append_record(self.run_dir, record)
        # The rename is the commit point: only a finished save ever carries the `epoch-` name.
        os.replace(saved, final)
        write_best(self.run_dir, self.best_metric)
        apply_retention(self.run_dir, final, self.keep_epochs)
        print(_epoch_line(record), flush=True)


class StepEvaluation(TrainerCallback):
    """Validation every `every` optimizer steps as well as at each epoch end (which evaluates anyway)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        at_epoch_end = state.epoch == int(state.epoch)
        if state.global_step % self.every == 0 and not at_epoch_end:
            control.should_evaluate = True


class EpochEarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping, counting epochs: only epoch-end validation (which also picks `best`) counts,
    not the passes `training.eval_steps` adds within an epoch."""

    def on_train_begin(self, args, state, control, **kwargs):
        pass  # the parent only warns that the best model is not reloaded at the end: the `best` link names it

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        if state.epoch == int(state.epoch):
            super().on_evaluate(args, state, control, metrics, **kwargs)


class LogLinePrinter(TrainerCallback):
    """One readable line per logging step, instead of transformers' raw dicts of quoted numbers."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "rewards/accuracies" not in logs:
            return  # evaluation lines come from the epoch summary; run totals from the final `done` line
        print(
            f"step {state.global_step}/{state.max_steps} (epoch {state.epoch:.2f}): loss {logs['loss']:.4f} "
            f"acc {logs['rewards/accuracies']:.3f} margin {logs['rewards/margins']:.3f} "
            f"lr {logs.get('learning_rate', float('nan')):.2e}",
            flush=True,
        )


def _epoch_line(record: dict) -> str:
    train, val = record["train"], record["val"]
    return (
        f"epoch {record['epoch']}: train loss {train['loss']:.4f} acc {train['accuracy']:.3f} "
        f"({train['tokens_per_s']:.0f} tok/s) | val loss {val.get('loss', float('nan')):.4f} "
        f"margin {val.get('margin', float('nan')):.3f} acc {val.get('accuracy', float('nan')):.3f}"
    )


class InterruptGuard(TrainerCallback):
    """SIGINT/SIGTERM stop training at the next step boundary; a save under way finishes first, none is started."""

    def __init__(self):
        self.interrupted = False
        self._previous = {}

    def _request_stop(self, signum, frame):
        if self.interrupted:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.interrupted = True
        print(f"\nreceived {signal.Signals(signum).name}: stopping after this step", file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[signum] = signal.signal(signum, self._request_stop)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.interrupted:  # a partial epoch is not checkpointed: resume replays it exactly
            control.should_save = False
            control.should_evaluate = False


def batch_plan(config: RecipeConfig, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, gradient-accumulation steps) that give exactly the effective batch."""
    effective = config.training.effective_batch_size
    if effective % world_size:
        raise ConfigError(
            f"{config.source_file}: training.effective_batch_size {effective} is not divisible by {world_size} processes"
        )
    micro = min(config.training.per_device_batch_size, effective // world_size)
    while (effective // world_size) % micro:
        micro -= 1
    return micro, effective // (world_size * micro)


# transformers renamed gradient checkpointing to activation checkpointing; use whichever this version knows.
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__ else "gradient_checkpointing"
)


def dpo_arguments(config: RecipeConfig, world_size: int, precision: str) -> DPOConfig:
    micro, accumulation = batch_plan(config, world_size)
    training = config.training
    report_to = [target for target in config.logging.report_to if target != "jsonl"]  # metrics.jsonl is ours
    best_metric = BEST_METRIC_LOGGED[training.best_metric]
    forward_batch = forward_batch_size(training.eval_batch_size)
    compile_model = on_gpu() if training.torch_compile is None else training.torch_compile
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
        warmup_steps=training.warmup_ratio,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        data_seed=training.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Fused AdamW needs the optimizer's tensors on an accelerator to pay off; plain AdamW elsewhere.
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        use_cpu=not torch.cuda.is_available(),
        # On a GPU, batches are copied from pinned memory without making the host wait for the copy.
        dataloader_pin_memory=on_gpu(),
        accelerator_config={"non_blocking": on_gpu()},
        # transformers' own nan filter reads every step's loss on the host; the divergence guard reads at log steps.
        logging_nan_inf_filter=False,
        **{CHECKPOINTING_ARGUMENT: training.gradient_checkpointing},
        torch_compile=compile_model,
        torch_compile_mode=training.compile_mode if compile_model else None,
        eval_strategy="epoch",
        # What early stopping watches; only set when it is on, so a plain run keeps no second notion of "best".
        metric_for_best_model=best_metric[0] if training.early_stopping_patience else None,
        greater_is_better=best_metric[1] if training.early_stopping_patience else None,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience counter resumes where it was
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


def _checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def resume_command(run_dir: Path) -> str:
    """The command that resumes this run, launched the way this one was."""
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ else "python"
    entry = "scripts/train.py" if sys.argv[0].endswith("train.py") else "-m dpo_recipe train"
    # The run directory's config.yaml is the resolved config, --set overrides included.
    return f"{launcher} {entry} --config {run_dir / RUN_CONFIG_FILE}"


def prepare_run(config: RecipeConfig, resume: bool = False, verbose: bool = False) -> PreparedRun:
    """Everything up to the first step: data, tokenizer, model, reference log-probs, and the trainer."""
    # Without a GPU, processes started by `accelerate launch` join one gloo group (MULTI_CPU) instead of each
    # training alone; under an FSDP launch config the trainer then shards over it (`_fsdp_over_gloo`).
    state = PartialState(cpu=not torch.cuda.is_available())
    precision = resolve_precision(config.training.precision, config.source_file)
    try:  # before any data or model work, so a typo in loss.type costs nothing
        loss_fn = resolve_loss(config.loss.type, config.loss.label_smoothing, config.loss.rpo_alpha)
    except ValueError as error:
        raise ConfigError(f"{config.source_file}: {error}") from None
    if config.model.lora is not None and fsdp_requested():
        raise ConfigError(
            f"{config.source_file}: model.lora is not supported under FSDP (an adapter's model fits each device: "
            "launch with multi_gpu.yaml)"
        )
    run_dir = config.run_dir
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise ConfigError(f"--resume: no complete epoch checkpoint in {run_dir}")
        print(f"resuming {run_dir} from {resume_from.name} (step {_checkpoint_step(resume_from)})", flush=True)
    elif config.training.overwrite:  # every process takes this branch, so the barrier below is always matched
        if state.is_main_process and run_dir.is_dir():
            print(f"overwrite: removing {run_dir}", flush=True)
            shutil.rmtree(run_dir)
        state.wait_for_everyone()
    elif epoch_dirs(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints: add --resume to continue that run, or --overwrite to start over")

    tokenizer_source = str(resume_from) if resume_from is not None else None
    # A local BPE is trained by the main process; the others read it.
    tokenizer, splits, report = load_run_data(config, tokenizer_source, state.main_process_first)
    data = prepare_data(splits, tokenizer, config.data, report)
    model = build_model(config.model, tokenizer, config.training.seed, config.data.max_length)
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        data.write(run_dir)
        # Starting over is what this launch did, not a setting of the run: its saved config, which the printed resume
        # command and `eval` read, must never wipe the run when used again.
        saved = copy.deepcopy(config)
        saved.training.overwrite = False
        atomic_write(run_dir / RUN_CONFIG_FILE, saved.to_yaml())
        print("\n".join(report.summary_lines()), flush=True)
        if config.model.tiny is not None and not reference_dir(run_dir).exists():
            model.save_pretrained(reference_dir(run_dir))
            tokenizer.save_pretrained(reference_dir(run_dir))
        if resume_from is not None:
            forget_epochs_after(run_dir, int(resume_from.name[len(EPOCH_PREFIX) :]))
            write_best(run_dir, config.training.best_metric)
    state.wait_for_everyone()

    if "wandb" in config.logging.report_to:
        os.environ.setdefault("WANDB_MODE", config.logging.wandb_mode)
        os.environ.setdefault("WANDB_PROJECT", config.logging.wandb_project)
    peft_config = None
    if config.model.lora is not None:
        from peft import LoraConfig
        from transformers.pytorch_utils import Conv1D

        lora = config.model.lora
        # GPT-2 stores its projections transposed (Conv1D); PEFT must know, or it warns and flips the flag itself.
        transposed = any(
            isinstance(module, Conv1D) for name, module in model.named_modules() if name.split(".")[-1] in lora.target_modules
        )
        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            fan_in_fan_out=transposed, task_type="CAUSAL_LM",
        )

    micro, _ = batch_plan(config, state.num_processes)
    training = config.training
    collator = make_collator(
        tokenizer.pad_token_id, training.prompt_sharing, training.pad_to_multiple_of, training.length_buckets,
        (data.train, data.val), micro,
    )
    totals = RunningTotals()
    guard = InterruptGuard()
    trainer = RecipeDPOTrainer(
        model=model,
        args=dpo_arguments(config, state.num_processes, precision),
        data_collator=collator,
        train_dataset=data.train,
        eval_dataset=data.val,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            EpochRecorder(run_dir, totals, config.training.best_metric, config.training.keep_epochs), guard, ShardReport()
        ],
        loss_fn=loss_fn,
        reference_cache_dir=config.training.reference_cache_dir,
        totals=totals,
        model_description=describe_model(config.model),
    )
    if config.training.eval_steps:
        trainer.add_callback(StepEvaluation(config.training.eval_steps))
    if config.training.early_stopping_patience:
        trainer.add_callback(EpochEarlyStopping(config.training.early_stopping_patience))
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
            f"{parallelism(trainer.accelerator)}",
            flush=True,
        )
        print(batching_line(trainer), flush=True)
        hits = ", ".join(f"{name} {'reused' if hit else 'computed'}" for name, hit in trainer.reference_cache_hits.items())
        print(f"reference log-probs: {hits} (cache {config.training.reference_cache_dir})", flush=True)
    return PreparedRun(trainer, guard, resume_from)


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
    atomic_write(path, json.dumps(info, indent=2))


def run_training(config: RecipeConfig, resume: bool = False, verbose: bool = False) -> int:
    """Train one config end to end. Returns the process exit code (0, or 130 when interrupted)."""
    started = time.perf_counter()
    run = prepare_run(config, resume, verbose)
    try:
        run.trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    finally:
        run.guard.restore()  # HF skips on_train_end when training raises
    run_dir = config.run_dir
    is_main = run.trainer.accelerator.is_main_process
    if run.guard.interrupted:
        if is_main:
            last = latest_checkpoint(run_dir)
            command = resume_command(run_dir)
            if last:
                print(f"interrupted; last complete checkpoint: {last}. Resume with: {command} --resume", file=sys.stderr)
            else:
                print(f"interrupted before any epoch finished; nothing to resume. Start again with: {command}", file=sys.stderr)
        return 130
    if is_main:
        _record_session(run_dir, run, time.perf_counter() - started)
        plot_run(run_dir)
        best = json.loads((run_dir / BEST_FILE).read_text()) if (run_dir / BEST_FILE).exists() else None
        if best:
            print(f"done: {run_dir} (best epoch {best['epoch']} by {best['metric']} = {best['value']:.4f})", flush=True)
    return 0
