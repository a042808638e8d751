"""The thin `trl.DPOTrainer` subclass.

What it changes, and why:
- data arrives tokenized and truncated by `dpo_recipe.data` (TRL's keep_start truncation drops whole pairs);
- batches use `packing.PairCollator`: the prompt is computed once per pair, and length grouping limits padding;
- reference log-probs are computed once and cached on disk (`reference`), so no epoch or sweep run redoes them;
- the loss is the configured pure function from `dpo_recipe.loss`;
- every logged mean is an exact per-pair mean (`totals`), each pair counted once per pass;
- a checkpoint saved inside an epoch resumes with that epoch's data order (HF's Trainer alone would draw the resumed
  epoch's order afresh from the RNG of a newly started process);
- a LoRA adapter keeps its dropout, which TRL's `disable_dropout` would zero with the model's;
- a compiled model traces batch shapes as dynamic from the first batch, and a compilation that fails (or passes the
  recompile limit) leaves the run training uncompiled, saying so, instead of ending it;
- an FSDP launch shards on CPU too (accelerate engages FSDP on GPUs only), and FSDP epoch checkpoints also hold the
  whole model, so every command loads them as ordinary HF model directories;
- every saved model directory carries the run's `scoring.json` (how it reads data), and TRL's model card gets a usage
  example in the run's data format and the training procedure (`card`).
Everything else (optimizer, schedule, mixed precision, DDP/FSDP/DeepSpeed, saving, resuming) is TRL/Trainer's own.
The callbacks that write the run directory are in `callbacks`; the run that ties a config to checkpoints is `run`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch
import torch._dynamo
import torch._functorch.config
from accelerate import PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast_object_list,
    gather_object,
    is_peft_model,
    parse_flag_from_env,
)
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DPOTrainer
from trl.models import prepare_deepspeed
from trl.trainer.utils import use_adapter

from .models import model_fingerprint, restore_adapter_dropout
from .packing import LengthBucketSampler, dataset_pair_logps, install_scoring_head, row_lengths, score_pairs
from .reference import cache_path, cached_reference_logps, with_reference_columns
from .card import complete_model_card
from .rundir import DATA_ORDER_RNG_FILE, MODEL_CARD_FILE, TOTALS_FILE, atomic_write, is_run_dir, write_scoring_settings
from .totals import LOGGED_MEANS, RunningTotals


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


# What a failed compilation raises: dynamo's own errors, a backend's (inductor's) arriving wrapped in
# BackendCompilerFailed, and, under `fail_on_recompile_limit_hit`, passing the recompile limit.
COMPILE_FAILURES = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


class RecipeDPOTrainer(DPOTrainer):
    def __init__(
        self, *args, model, loss_fn, reference_cache_dir: str, totals: RunningTotals | None = None, ref_model=None,
        scoring: dict | None = None, **kwargs,
    ):
        self.loss_fn = loss_fn
        # `rundir.scoring_settings` of the run, written into every saved model directory; None outside a run.
        self.scoring = scoring
        self.reference_cache_dir = reference_cache_dir
        self.reference_cache_hits: dict[str, bool] = {}
        self.totals = totals or RunningTotals()
        self.compile_fallback: str | None = None  # why this run stopped compiling, once it has
        # Hashed here, before anything is sharded (DTensors cannot be read), by the main process, whose weights are
        # the ones every rank trains from.
        self._reference_key = _main_process_value(lambda: model_fingerprint(ref_model or model))
        # Under FSDP the reference pass needs a sharded copy of the starting model; without one TRL reloads the model
        # from `_name_or_path`, which a locally built model lacks. The copy is freed once the log-probs are computed.
        copied = ref_model is None and fsdp_requested() and kwargs.get("peft_config") is None
        super().__init__(*args, model=model, ref_model=copy.deepcopy(model) if copied else ref_model, **kwargs)
        if copied:
            self.ref_model = None
        if self.args.disable_dropout and is_peft_model(self.model):
            restore_adapter_dropout(self.model)
        # Before accelerate prepares the model, so its mixed-precision autocast surrounds the scoring forward too.
        install_scoring_head(self.model)
        self._resumed_totals: dict | None = None
        self._resumed_data_order: torch.Tensor | None = None
        # torch's RNG state as the current epoch began, which its data order is drawn from (`_start_epoch_window`).
        self._epoch_rng_state: torch.Tensor | None = None
        self.add_callback(_EpochWindow(self))

    def _build_accelerator_args(self, **kwargs):
        args = super()._build_accelerator_args(**kwargs)
        plugin = args.get("dynamo_plugin")
        if plugin is not None and plugin.dynamic is None:  # None: dynamo's default; ACCELERATE_DYNAMO_USE_DYNAMIC wins
            # Batch widths differ from batch to batch (or bucket to bucket). By default dynamo compiles the first width
            # statically and compiles again, dynamically, at the second; traced dynamic from the first batch, the model
            # compiles once (benchmarks/results.md, "torch.compile on the CPU").
            plugin.dynamic = True
        return args

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.args.torch_compile:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.compile_fallback is None:
            try:
                with _compilation_fails_in_the_forward():
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            except COMPILE_FAILURES as error:
                # Raised by the model's forward before anything was recorded or any gradient computed: this batch is
                # computed again below, eagerly, like every later one.
                self.compile_fallback = compile_failure(error)
                rank = f"rank {self.args.process_index}: " if self.args.world_size > 1 else ""
                print(
                    f"{rank}torch.compile failed at optimizer step {self.state.global_step + 1} "
                    f"({self.compile_fallback}): this run continues uncompiled",
                    flush=True,
                )
        with torch.compiler.set_stance("force_eager"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
            _fsdp_over_gloo(self.accelerator)
            self.is_fsdp_enabled = True

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        run_dir = Path(self.args.output_dir)
        if self.is_world_process_zero() and is_run_dir(run_dir):  # a run's card: usage and training procedure
            card = run_dir / MODEL_CARD_FILE
            card.write_text(complete_model_card(card.read_text(), run_dir))

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
        # Mixture-of-experts models: their router's load-balancing loss joins the loss, weighted as TRL weighs it
        # (`router_aux_loss_coef`: DPOConfig's, else the model config's).
        chosen_logps, rejected_logps, aux_loss = score_pairs(model, inputs, router_aux_loss=self.aux_loss_enabled)
        losses, chosen_rewards, rejected_rewards = self.loss_fn(
            chosen_logps, rejected_logps, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], self.beta,
            chosen_tokens=inputs["chosen_tokens"], rejected_tokens=inputs["rejected_tokens"],
        )
        loss = losses.mean()
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss
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
        # Per pair, not per process, and each pair of the pass once: the pairs accelerate repeats to even out the last
        # batches are left out by count (`RunningTotals.real_pairs`). The sums stay on the device until a window is read.
        gathered = self.accelerator.gather(per_pair)
        stats = gathered[: self.totals.real_pairs("train" if mode == "train" else "eval", gathered.shape[0])].sum(dim=0)
        where = f"optimizer step {self.state.global_step + 1}" if mode == "train" else "evaluation"
        windows = ("train", "log") if mode == "train" else ("eval",)
        self.totals.record(windows, f"{where} (epoch {self.state.epoch or 0:.2f})", stats)
        return (loss, None) if return_outputs else loss

    def _save_checkpoint(self, model, trial):
        self.totals.flush()  # a step that diverged since the last read raises here, before anything is written
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # inside the checkpoint, before callbacks commit it
            checkpoint = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            atomic_write(checkpoint / TOTALS_FILE, json.dumps(self.totals.snapshot()))
            if self._epoch_rng_state is not None:
                save_file({"cpu": self._epoch_rng_state}, checkpoint / DATA_ORDER_RNG_FILE)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = Path(resume_from_checkpoint) if isinstance(resume_from_checkpoint, (str, os.PathLike)) else None
        saved = checkpoint / TOTALS_FILE if checkpoint is not None else None
        self._resumed_totals = json.loads(saved.read_text()) if saved is not None and saved.is_file() else None
        order = checkpoint / DATA_ORDER_RNG_FILE if checkpoint is not None else None
        self._resumed_data_order = load_file(order)["cpu"] if order is not None and order.is_file() else None
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self.totals.flush()
        # TRL wrote the card before the last save; now the last epoch and the best one are known.
        self.create_model_card(model_name=Path(self.args.output_dir).name)
        return output

    def _start_epoch_window(self, state) -> None:
        """The `train` window starts with each epoch. A resumed run goes on with the windows its checkpoint kept: the
        log window always, and the epoch's too when the checkpoint was saved inside an epoch (a step checkpoint, or
        `training.max_steps`), so that epoch's means still cover all of its pairs.

        Each epoch's data order is drawn from torch's RNG as the epoch's first batch is fetched, and the state it was
        drawn from goes into every checkpoint. Resumed inside an epoch, HF's Trainer skips the batches already trained
        on but draws the order from the RNG of the new process, and restores the checkpoint's RNG only after that:
        the state the epoch began with is put back first, so the order is the epoch's own."""
        resumed, self._resumed_totals = self._resumed_totals, None
        data_order, self._resumed_data_order = self._resumed_data_order, None
        inside_an_epoch = resumed is not None and state.epoch % 1 != 0
        if resumed is not None:
            self.totals.restore(resumed, ("train", "log") if inside_an_epoch else ("log",))
        if not inside_an_epoch:
            self.totals.reset("train", len(self.train_dataset))
        if inside_an_epoch and data_order is not None:
            torch.random.set_rng_state(data_order)
        self._epoch_rng_state = torch.random.get_rng_state()

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
        if self.scoring is not None and self.args.should_save:  # how this model reads data, wherever it is copied
            write_scoring_settings(Path(output_dir or self.args.output_dir), self.scoring)

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

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        dataset = self.eval_dataset[dataset] if isinstance(dataset, str) else dataset
        self.totals.reset("eval", None if isinstance(dataset, dict) else len(dataset))
        # Each evaluation's DataLoader draws a seed from torch's global generator; without the fork, turning
        # `training.eval_steps` on would change the batch order of every later epoch, so not the same training.
        with torch.random.fork_rng(devices=[]):
            metrics = super().evaluate(eval_dataset, *args, **kwargs)
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


class _EpochWindow(TrainerCallback):
    """Starts each epoch's `train` window in the trainer that added it (`RecipeDPOTrainer._start_epoch_window`)."""

    def __init__(self, trainer: RecipeDPOTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._start_epoch_window(state)


@contextlib.contextmanager
def _compilation_fails_in_the_forward():
    """Every compilation failure raised by the forward, where nothing has been computed yet.

    AOTAutograd compiles a backward graph lazily, at the first backward, after the step has added to gradients;
    compiled with its forward, a failure leaves nothing half done. Past the recompile limit dynamo would run that one
    frame eagerly, with a warning, and the rest compiled; raised instead, the run falls back as a whole.
    """
    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            yield


def compile_failure(error: BaseException) -> str:
    """A compilation failure in one line: the error a backend raised (not dynamo's wrapper), and its first line."""
    cause = getattr(error, "inner_exception", None) or error
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    return f"{type(cause).__name__}: {first[:240]}" if first else type(cause).__name__


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


