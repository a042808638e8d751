"""Side-by-side speed benchmark: this recipe's `RecipeDPOTrainer` against plain `trl.DPOTrainer`.

Every trainer gets the same randomly initialised GPT-2 (one seed, so the same weights), the same pre-tokenized pairs,
the same effective batch, number of optimizer steps, learning rate, device and precision:
- `ours`: `RecipeDPOTrainer` configured as `run_training` configures it on this device (its `null` settings take the
  device's defaults, `packing.DEVICE_DEFAULTS`: on CPU shared-prompt rows, on a GPU separate ones; length-grouped
  batches, no compilation), reference log-probs computed once into an on-disk cache (a cold one: its cost is timed).
- variants (on request), e.g. `ours_compiled`: the same with further training settings (`training.torch_compile: true`),
  to measure what each buys; any compilation is timed.
- `trl`: plain `trl.DPOTrainer` with its defaults, gradient checkpointing off; the reference model runs every step.
- `trl_precompute`: the same with `precompute_ref_log_probs=True` (reference log-probs once, before training).
Plain TRL is subclassed only to skip `_prepare_dataset`, because the pairs arrive tokenized; its compute path is TRL's.

Each run happens in a fresh process, so its peak memory is its own and no run warms a cache for another.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing
import os
import random
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .config import DataConfig, LossConfig, RecipeConfig, TrainingConfig
from .data import tokenize_pairs
from .sources import DataReport, PreferencePair, read_pairs, split_dialogue
from .synthetic import hh_length_rows

# The pairs the issue measured; `make bench` runs from the repository root, next to ../shared.
REAL_DATA = Path("../shared/data/hh-rlhf-harmless-base-1812.jsonl.gz")
TRAINERS = ("ours", "trl", "trl_precompute")
MODEL_SHAPES = {
    # Small enough for a 2-core CPU. With the default 2048-token vocabulary the LM head is ~1/7 of the FLOPs per
    # position: about its share in GPT-2 124M, whose 50257-word head projects only the ~40% of positions that are
    # scored. So the body, not the head, sets the pace, as in the real model.
    "tiny": {"n_embd": 256, "n_layer": 4, "n_head": 4},
    # GPT-2 124M as the study trains it; its vocabulary stays GPT-2's even though the local tokenizer's is smaller.
    "124m": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
}
# In fp32 the two trainers compute the same sums in a different order; bf16 keeps only ~3 significant digits.
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}


@dataclass
class BenchSettings:
    size: str = "tiny"
    data: str | None = None  # hh-rlhf JSONL(.gz); None: hh-rlhf-length synthetic pairs
    train_pairs: int = 256
    eval_pairs: int = 300  # the study's validation set: 10% of 3000 pairs
    epochs: int = 2
    batch_size: int = 16
    # Pairs per batch for evaluation and the one-off reference passes. On the 2-core CPU, 32 pairs per forward ran
    # our reference pass 1.6x slower than 16 (larger activations fall out of cache), so `make bench` uses 16 for every
    # trainer. None: ours takes its device default (`training.eval_batch_size: null`: 32) and plain TRL
    # the training batch.
    eval_batch_size: int | None = 16
    max_length: int = 256
    tokenizer_vocab_size: int = 2048
    learning_rate: float = 1e-4
    beta: float = 0.1
    seed: int = 42
    baselines: tuple[str, ...] = ("trl", "trl_precompute")
    # TrainingConfig settings for ours beyond the device defaults, e.g. {"length_buckets": 5} to rehearse the GPU
    # path on CPU.
    ours_training: dict[str, Any] = field(default_factory=dict)
    # Further runs of ours after the agreement check, by name, each with these training settings on top of
    # `ours_training`, e.g. {"ours_compiled": {"torch_compile": True}}.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Training steps profiled after the timed run, for the device kernel time per step. None: 5 on a GPU, none on CPU
    # (where there is no device time to report; a rehearsal may still ask for some, to exercise the code).
    profile_steps: int | None = None
    agreement_steps: int = 5
    # Each trainer runs this many times, interleaved, and its fastest run is reported: on a shared machine other
    # work only ever slows a run down (here two runs of the same trainer took 71.0 s and 88.6 s).
    repeats: int = 2
    peak_flops: float | None = None  # the device's peak FLOP/s in the run's precision, for MFU
    output: str | None = "benchmarks/results.md"
    command: str = ""


@dataclass
class BenchData:
    description: str
    tokenizer: Any
    train: dict[str, list]  # tokenized columns: plain lists travel to the worker processes
    eval: dict[str, list]
    report_lines: list[str]


@dataclass
class Job:
    trainer: str
    group_by_length: bool = True  # ours only
    max_steps: int = -1
    logging_steps: int = 10
    evaluate: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # ours only: training settings on top of `ours_training`


@dataclass
class RunResult:
    seconds: float  # trainer construction (any reference pass included) + train()
    steps: int
    pairs: int
    data_tokens: int  # non-pad tokens of the pairs as [prompt, chosen] + [prompt, rejected]: equal for every trainer
    epoch_tokens: int  # non-pad positions one epoch of the trainer's own batches holds
    epoch_positions: int  # all positions of those batches, padding included
    epoch_pairs: int
    reference_tokens: int  # non-pad positions the reference model processed
    parameters: int
    peak_memory: int
    losses: list[float] = field(default_factory=list)
    eval_seconds: float | None = None
    eval_pairs: int = 0
    run_seconds: list[float] = field(default_factory=list)  # every run of this trainer, when it ran more than once
    epoch_scored: int = 0  # scored positions in one epoch of ours' batches
    epoch_scored_slots: int = 0  # the LM head's slots for them, bucket padding included
    step_seconds: float | None = None  # median wall time between optimizer steps in the last epoch
    kernel_ms: float | None = None  # device kernel time per profiled training step (CUDA only)
    eval_batch_size: int = 0

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    @property
    def positions_per_pair(self) -> float:
        return self.epoch_positions / self.epoch_pairs

    @property
    def padding(self) -> float:
        return 1 - self.epoch_tokens / self.epoch_positions

    @property
    def scored_padding(self) -> float | None:
        return 1 - self.epoch_scored / self.epoch_scored_slots if self.epoch_scored_slots else None

    def mfu(self, epochs: int, peak_flops: float | None) -> float | None:
        """6·N·(training tokens) + 2·N·(reference-forward tokens), over the time, over the peak."""
        if not peak_flops:
            return None
        flops = 6 * self.parameters * self.epoch_tokens * epochs + 2 * self.parameters * self.reference_tokens
        return flops / self.seconds / peak_flops


def draw(pool: list, count: int, rng: random.Random) -> list:
    """`count` items from passes over seeded shuffles of `pool`: every item once before any repeats."""
    drawn: list = []
    while len(drawn) < count:
        order = list(pool)
        rng.shuffle(order)
        drawn.extend(order)
    return drawn[:count]


def load_bench_data(settings: BenchSettings) -> BenchData:
    """Pairs drawn from the data, one local byte-level BPE, tokenized and truncated once for every trainer."""
    from .models import train_local_tokenizer

    config = DataConfig(source=settings.data or "synthetic", max_length=settings.max_length)
    report = DataReport()
    needed = settings.train_pairs + settings.eval_pairs
    if settings.data:
        pool = read_pairs(settings.data, "train", config, report)
        description = f"{settings.data}: {len(pool)} usable pairs"
    else:
        rows = hh_length_rows(needed, seed=settings.seed)
        pool = [PreferencePair(i, *split_dialogue(row["chosen"], row["rejected"])) for i, row in enumerate(rows, 1)]
        description = f"synthetic pairs with hh-rlhf-like lengths (`synthetic.hh_length_rows`): {len(pool)}"
    if needed > len(pool):
        description += f"; {needed} drawn in passes over seeded shuffles (each pair once before any repeats)"
    pairs = draw(pool, needed, random.Random(settings.seed))
    # The tokenizer sees the whole pool, so token lengths do not depend on which subset is drawn.
    tokenizer = train_local_tokenizer(
        [text for pair in pool for text in (pair.prompt, pair.chosen, pair.rejected)], settings.tokenizer_vocab_size
    )
    train = tokenize_pairs(pairs[: settings.train_pairs], tokenizer, config, "bench_train", report)
    evaluation = tokenize_pairs(pairs[settings.train_pairs :], tokenizer, config, "bench_eval", report)
    return BenchData(description, tokenizer, train.to_dict(), evaluation.to_dict(), report.summary_lines())


def layout_stats(columns: dict[str, list]) -> dict[str, float]:
    prompts = [len(ids) for ids in columns["prompt_ids"]]
    responses = [len(ids) for column in ("chosen_ids", "rejected_ids") for ids in columns[column]]
    both = [c + r for c, r in zip(responses[: len(prompts)], responses[len(prompts) :])]
    separate = sum(2 * p + r for p, r in zip(prompts, both))
    shared = sum(p + r + 1 for p, r in zip(prompts, both))  # the prompt's last token repeats once per branch
    return {
        "median_prompt": sorted(prompts)[len(prompts) // 2],
        "median_response": sorted(responses)[len(responses) // 2],
        "separate_tokens": separate,
        "shared_saving": 1 - shared / separate,
    }


def build_bench_model(settings: BenchSettings, tokenizer):
    from .config import ModelConfig
    from .models import build_model

    return build_model(ModelConfig(tiny=MODEL_SHAPES[settings.size]), tokenizer, settings.seed, settings.max_length)


def _recipe_trainer(job: Job, settings: BenchSettings, model, tokenizer, train, precision: str, work: str):
    from .loss import resolve_loss
    from .packing import make_collator
    from .run import dpo_arguments
    from .trainer import RecipeDPOTrainer

    config = RecipeConfig(
        run_name="bench",
        training=TrainingConfig(
            output_dir=work,
            num_epochs=settings.epochs,
            learning_rate=settings.learning_rate,
            effective_batch_size=settings.batch_size,
            per_device_batch_size=settings.batch_size,
            eval_batch_size=settings.eval_batch_size,
            seed=settings.seed,
            group_by_length=job.group_by_length,
            logging_steps=job.logging_steps,
            reference_cache_dir=os.path.join(work, "reference_cache"),  # empty: the reference pass is paid here
            **{**settings.ours_training, **job.settings},
        ),
        loss=LossConfig(beta=settings.beta),
    )
    # Saving and per-epoch evaluation are left out for every trainer alike; evaluation is timed on its own.
    args = dataclasses.replace(
        dpo_arguments(config, 1, precision),
        eval_strategy="no", save_strategy="no", max_steps=job.max_steps, disable_tqdm=True,
    )
    training = config.training
    collator = make_collator(
        tokenizer.pad_token_id, training.prompt_sharing, training.pad_to_multiple_of, training.length_buckets,
        (train,), settings.batch_size,
    )
    return RecipeDPOTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train,
        processing_class=tokenizer,
        loss_fn=resolve_loss(config.loss.type, config.loss.label_smoothing, config.loss.rpo_alpha),
        reference_cache_dir=config.training.reference_cache_dir,
    )


def _trl_trainer(job: Job, settings: BenchSettings, model, reference, tokenizer, train, precision: str, work: str):
    import torch
    from trl import DPOConfig, DPOTrainer

    from .run import CHECKPOINTING_ARGUMENT

    class PretokenizedDPOTrainer(DPOTrainer):
        """Plain TRL, given pairs that are already tokenized: only dataset preparation is skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    args = DPOConfig(
        output_dir=work,
        num_train_epochs=settings.epochs,
        max_steps=job.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size or settings.batch_size,
        seed=settings.seed,
        data_seed=settings.seed,
        beta=settings.beta,
        bf16=precision == "bf16",
        **{CHECKPOINTING_ARGUMENT: False},
        precompute_ref_log_probs=job.trainer == "trl_precompute",
        logging_steps=job.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        # TRL's default pins host memory, which only a GPU uses; off elsewhere, as the recipe sets it (it warns on CPU).
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return PretokenizedDPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=train, processing_class=tokenizer
    )


def _epoch_positions(trainer) -> tuple[int, int, int, int]:
    """(non-pad positions, all positions, scored positions, scored-position slots) in one epoch of the trainer's own
    train batches; the last two for ours only (TRL's head takes every position)."""
    real = total = scored = slots = 0
    for batch in trainer.get_train_dataloader():
        tokens = batch["pair_tokens"] if "pair_tokens" in batch else batch["attention_mask"]
        real += int(tokens.sum())
        total += batch["input_ids"].numel()
        if "scored_positions" in batch:
            scored += int((batch["scored_chosen"] | batch["scored_rejected"]).sum())
            slots += len(batch["scored_positions"])
    return real, total, scored, slots


class StepClock(TrainerCallback):
    """Wall time at each optimizer step's end. No device synchronisation: that would add the very waits being
    removed. Over many steps the host can run only a bounded queue ahead of the device, so the median interval is the
    steady step time whichever of the two sets the pace."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []  # (epoch, time)

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append((state.epoch, time.perf_counter()))

    def steady_step(self) -> float | None:
        last_epoch = math.ceil(self.stamps[-1][0] - 1e-9) if self.stamps else 0
        times = [t for epoch, t in self.stamps if epoch > last_epoch - 1 + 1e-9]
        intervals = sorted(b - a for a, b in zip(times, times[1:]))
        return intervals[len(intervals) // 2] if intervals else None


def device_kernel_ms(trainer, steps: int) -> float | None:
    """Device kernel time per training step, from torch.profiler over `steps` steps after two warm ones (CUDA only;
    on CPU the steps still run, so a rehearsal exercises this code). The model is trained further: call it last."""
    import itertools

    import torch

    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    model = trainer.model_wrapped
    model.train()
    batches = list(itertools.islice(iter(trainer.get_train_dataloader()), steps + 2))

    def step(batch):
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    for batch in batches[:2]:
        step(batch)
    _synchronize()
    with torch.profiler.profile(activities=activities) as profile:
        for batch in batches[2:]:
            step(batch)
        _synchronize()
    if not cuda:
        return None
    busy = sum(event.self_device_time_total for event in profile.key_averages()) / 1e3
    return busy / max(len(batches) - 2, 1)


class PeakMemory:
    """CUDA: `max_memory_allocated`. CPU: peak RSS (`getrusage` ru_maxrss) minus the RSS when measuring started."""

    def __init__(self):
        import psutil
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start = psutil.Process().memory_info().rss

    def peak(self) -> int:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_job(job: Job, settings: BenchSettings, data: BenchData) -> RunResult:
    """Train (and optionally evaluate) one trainer; runs in its own process."""
    import datasets
    import torch
    import transformers
    from transformers import PrinterCallback
    from trl.trainer.utils import add_fused_lm_head

    from .models import resolve_precision

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    precision = resolve_precision("auto", "benchmark")
    train = datasets.Dataset.from_dict(data.train)
    model = build_bench_model(settings, data.tokenizer)
    with tempfile.TemporaryDirectory() as work:
        memory = PeakMemory()
        start = time.perf_counter()
        # Plain TRL keeps a second model for its reference; a copy of the same weights, counted in its time and memory.
        reference = copy.deepcopy(model) if job.trainer == "trl" else None
        if job.trainer == "ours" or job.trainer in settings.variants:
            trainer = _recipe_trainer(job, settings, model, data.tokenizer, train, precision, work)
        else:
            trainer = _trl_trainer(job, settings, model, reference, data.tokenizer, train, precision, work)
        trainer.remove_callback(PrinterCallback)  # log lines would interleave with the benchmark's output
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
        _synchronize()
        seconds = time.perf_counter() - start
        peak = memory.peak()
        epoch_tokens, epoch_positions, epoch_scored, epoch_scored_slots = _epoch_positions(trainer)
        epochs = trainer.state.epoch or 0
        result = RunResult(
            seconds=seconds,
            steps=trainer.state.global_step,
            pairs=min(trainer.state.global_step * settings.batch_size, round(epochs * len(train))),
            data_tokens=round(layout_stats(data.train)["separate_tokens"] * epochs),
            epoch_tokens=epoch_tokens,
            epoch_positions=epoch_positions,
            epoch_pairs=len(train),
            # trl runs the reference at every step; the other two once over the train set
            reference_tokens=round(epoch_tokens * (epochs if job.trainer == "trl" else 1)),
            parameters=sum(p.numel() for p in model.parameters()),
            peak_memory=peak,
            losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            epoch_scored=epoch_scored,
            epoch_scored_slots=epoch_scored_slots,
            step_seconds=clock.steady_step(),
            eval_batch_size=trainer.args.per_device_eval_batch_size,
        )
        if job.evaluate:
            if trainer.ref_model is None:
                # Full fine-tuning keeps no reference model; give both trainers the initial weights to score a new
                # dataset with, which each does its own way (ours: a cold cached pass, sorted by length; TRL: its own).
                initial = build_bench_model(settings, data.tokenizer)
                add_fused_lm_head(initial)
                trainer.ref_model = initial.to(trainer.accelerator.device).eval()
            evaluation = datasets.Dataset.from_dict(data.eval)
            _synchronize()
            start = time.perf_counter()
            trainer.evaluate(eval_dataset=evaluation)
            _synchronize()
            result.eval_seconds = time.perf_counter() - start
            result.eval_pairs = len(evaluation)
        profile_steps = (5 if torch.cuda.is_available() else 0) if settings.profile_steps is None else settings.profile_steps
        if job.max_steps < 0 and profile_steps:
            result.kernel_ms = device_kernel_ms(trainer, profile_steps)
    return result


def run_in_fresh_process(job: Job, settings: BenchSettings, data: BenchData) -> RunResult:
    # spawn, not fork: a forked child inherits OpenMP and CUDA state that is not fork-safe
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_job, job, settings, data).result()
