"""The side-by-side benchmark's run and its write-up: every trainer in a fresh process, the fastest of repeated runs,
the loss-agreement check, the printed table and its sections of benchmarks/results.md. What is measured, and how,
is `dpo_recipe.benchmark`."""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

from .benchmark import (
    LOSS_TOLERANCE, MODEL_SHAPES, BenchData, BenchSettings, Job, RunResult, layout_stats, load_bench_data,
    run_in_fresh_process,
)
from .results_file import remove_section, replace_section, replace_title_block


def machine_description() -> dict[str, str]:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = {
        "cpu": f"{cpu}, {os.cpu_count()} cores (torch uses {torch.get_num_threads()} threads)",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}",
    }
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x"


def _memory(result: RunResult) -> str:
    return f"{result.peak_memory / 2**20:,.0f} MiB"


def agreement_check(ours: RunResult, trl: RunResult, precision: str) -> tuple[list[str], bool]:
    lines = ["| step | ours (grouping off) | plain TRL | relative difference |", "|---:|---:|---:|---:|"]
    worst = 0.0
    for step, (a, b) in enumerate(zip(ours.losses, trl.losses), start=1):
        difference = abs(a - b) / max(abs(b), 1e-12)
        worst = max(worst, difference)
        lines.append(f"| {step} | {a:.8f} | {b:.8f} | {difference:.1e} |")
    tolerance = LOSS_TOLERANCE.get(precision)
    complete = len(ours.losses) == len(trl.losses) > 0
    ok = complete and (tolerance is None or worst <= tolerance)
    verdict = (
        f"largest relative difference {worst:.1e}, tolerance {tolerance:g}: {'PASS' if ok else 'FAIL'}"
        if tolerance is not None
        else f"largest relative difference {worst:.1e} (in {precision}: reported, not asserted)"
    )
    return lines + ["", verdict], ok


def run_benchmark(settings: BenchSettings) -> int:
    """Run every trainer, print and write the comparison. Returns 0, or 1 if the losses disagree."""
    import torch

    from .models import resolve_precision

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    precision = resolve_precision("auto", "benchmark")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = machine_description()
    data = load_bench_data(settings)
    stats = layout_stats(data.train)
    print(f"machine: {'; '.join(machine.values())}")
    print(f"data: {data.description}; {settings.train_pairs} train + {settings.eval_pairs} eval pairs")
    print(
        f"tokens: median prompt {stats['median_prompt']}, median response {stats['median_response']:.0f}; "
        f"sharing the prompt saves {stats['shared_saving']:.0%} of the tokens"
    )
    print("\n".join(data.report_lines))
    print(
        f"model: GPT-2 {settings.size} {MODEL_SHAPES[settings.size]}, tokenizer vocab {len(data.tokenizer)}, "
        f"{device} {precision}; batch {settings.batch_size}, {settings.epochs} epochs. Plain TRL is "
        "`trl.DPOTrainer` with only `_prepare_dataset` overridden (to accept these pre-tokenized pairs); its compute "
        "path is TRL's own.",
        flush=True,
    )

    jobs = [Job("ours", evaluate=True)] + [Job(name, evaluate=name == "trl") for name in settings.baselines]
    runs: dict[str, list[RunResult]] = {job.trainer: [] for job in jobs}
    failures: list[str] = []
    agreement: list[str] = []

    def write() -> None:
        # After every run, so a run cut short (a device's time limit) still leaves what it measured.
        if settings.output:
            results = {name: fastest(trainer_runs) for name, trainer_runs in runs.items() if trainer_runs}
            table = summary_table(results, settings) if "ours" in results else []
            write_results(
                Path(settings.output), settings, machine, data, stats, precision, device, table, agreement, failures
            )

    def attempt(job: Job, label: str) -> RunResult | None:
        try:
            return run_in_fresh_process(job, settings, data)
        except Exception as error:  # one failed trainer must not cost the others' measurements
            failures.append(f"{label}: {type(error).__name__}: {error}")
            print(f"  FAILED: {failures[-1]}", flush=True)
            return None

    for repeat in range(1, settings.repeats + 1):
        for job in jobs:
            print(f"running {job.trainer} (run {repeat} of {settings.repeats}) ...", flush=True)
            result = attempt(job, f"{job.trainer} run {repeat}")
            if result is None:
                continue
            runs[job.trainer].append(result)
            evaluation = f", evaluation {result.eval_seconds:.1f} s" if result.eval_seconds else ""
            print(f"  {result.seconds:.1f} s, {result.pairs_per_s:.2f} pairs/s, {result.steps} steps{evaluation}", flush=True)
            write()
    agreed = True
    if settings.agreement_steps:
        print("loss agreement: ours with length grouping off (the same sampler and order as TRL) vs plain TRL ...")
        steps = settings.agreement_steps
        # Uncompiled: the check is of the arithmetic (test_gpu_path shows compiled and eager runs agree), and a
        # 5-step run would spend most of its time compiling.
        ours_job = Job("ours", group_by_length=False, max_steps=steps, logging_steps=1, settings={"torch_compile": False})
        ours = attempt(ours_job, "agreement, ours")
        trl = attempt(Job("trl", max_steps=steps, logging_steps=1), "agreement, trl")
        if ours is not None and trl is not None:
            agreement, agreed = agreement_check(ours, trl, precision)
            print("\n".join(agreement))
        else:
            agreed = False
        write()
    for name, variant in settings.variants.items():
        print(f"running {name} (ours with {variant}) ...", flush=True)
        result = attempt(Job(name, evaluate=True, settings=variant), name)
        if result is not None:
            runs[name] = [result]
            print(f"  {result.seconds:.1f} s, {result.pairs_per_s:.2f} pairs/s, {result.steps} steps", flush=True)
        write()

    results = {name: fastest(trainer_runs) for name, trainer_runs in runs.items() if trainer_runs}
    if "ours" in results:
        print("\n" + "\n".join(summary_table(results, settings)))
    if settings.output:
        print(f"\nwrote {settings.output}")
    return 0 if agreed and not failures else 1


def fastest(runs: list[RunResult]) -> RunResult:
    """The fastest training and the fastest evaluation among one trainer's runs, with the highest memory peak."""
    best = min(runs, key=lambda run: run.seconds)
    eval_times = [run.eval_seconds for run in runs if run.eval_seconds]
    return dataclasses.replace(
        best,
        eval_seconds=min(eval_times) if eval_times else None,
        peak_memory=max(run.peak_memory for run in runs),
        run_seconds=[run.seconds for run in runs],
    )


def _optional(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def summary_table(results: dict[str, RunResult], settings: BenchSettings) -> list[str]:
    ours = results["ours"]
    show_mfu = settings.peak_flops is not None
    header = (
        "| trainer | time (s) | pairs/s | real tokens/s | positions/pair | padding | head padding | steady step (ms) "
        "| kernel time/step (ms) | peak memory | eval batch | eval pairs/s |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if show_mfu:
        header, rule = header + " MFU |", rule + "---:|"
    lines = [header, rule]
    for name, result in results.items():
        eval_rate = f"{result.eval_pairs / result.eval_seconds:.2f}" if result.eval_seconds else "-"
        row = (
            f"| {name} | {result.seconds:.1f} | {result.pairs_per_s:.2f} | {result.data_tokens / result.seconds:,.0f} "
            f"| {result.positions_per_pair:.0f} | {result.padding:.1%} | {_optional(result.scored_padding, '.1%')} "
            f"| {_optional(result.step_seconds and result.step_seconds * 1e3, '.1f')} "
            f"| {_optional(result.kernel_ms, '.1f')} | {_memory(result)} | {result.eval_batch_size or '-'} | {eval_rate} |"
        )
        if show_mfu:
            row += f" {result.mfu(settings.epochs, settings.peak_flops):.1%} |"
        lines.append(row)
    lines += ["", "| ours vs | training pairs/s | peak memory | evaluation pairs/s |", "|---|---:|---:|---:|"]
    for name, result in results.items():
        if name == "ours":
            continue
        evaluation = (
            _ratio(ours.eval_pairs / ours.eval_seconds, result.eval_pairs / result.eval_seconds)
            if result.eval_seconds and ours.eval_seconds
            else "-"
        )
        memory = _ratio(ours.peak_memory, result.peak_memory) if result.peak_memory > 0 else "-"
        lines.append(f"| {name} | {_ratio(ours.pairs_per_s, result.pairs_per_s)} | {memory} | {evaluation} |")
    if settings.repeats > 1:
        every_run = "; ".join(
            f"{name} {', '.join(f'{seconds:.1f}' for seconds in result.run_seconds)} s" for name, result in results.items()
        )
        lines += [
            "",
            f"Each trainer ran {settings.repeats} times, interleaved; the tables show its fastest training run and its "
            f"fastest evaluation. Training time of every run: {every_run}.",
        ]
    return lines


def write_results(
    path: Path, settings, machine, data: BenchData, stats, precision: str, device: str, table, agreement, failures=()
) -> None:
    from .packing import DEVICE_DEFAULTS

    memory_kind = (
        "CUDA `max_memory_allocated` (weights, optimizer state and activations)"
        if device == "cuda"
        else "peak RSS of the trainer's own process (`getrusage` ru_maxrss) minus its RSS just before the trainer "
        "was built (data, model and imports are already loaded then). It includes the work buffer of TRL's chunked "
        "LM head, an fp32 tile of (positions, 32768) whatever the vocabulary, positions capped at 4096 (0.5 GiB). "
        "Ours passes the head only the scored positions, fewer than 4096 in most batches, though its longest "
        "batches can reach the cap. RSS peaks also reflect the allocator, so read this column as rough"
    )
    lines = [
        "# Benchmark: RecipeDPOTrainer vs plain trl.DPOTrainer",
        "",
        f"Command: `{settings.command}`",
        "",
        "Hardware and software: " + "; ".join(f"{key}: {value}" for key, value in machine.items()),
        "",
        f"- Data: {data.description}. {settings.train_pairs} train pairs, {settings.eval_pairs} evaluation pairs, "
        f"tokenized once with `dpo_recipe.data` (max_length {settings.max_length}) by a byte-level BPE trained on "
        f"the pairs (vocab {len(data.tokenizer)}). Median prompt {stats['median_prompt']} tokens, median response "
        f"{stats['median_response']:.0f}; sharing the prompt saves {stats['shared_saving']:.0%} of the tokens.",
        f"- Model: randomly initialised GPT-2 `{settings.size}` {MODEL_SHAPES[settings.size]} (the same seed, so "
        f"the same weights, for every trainer), {device}, {precision}.",
        f"- Training: effective batch {settings.batch_size}, {settings.epochs} epochs, lr {settings.learning_rate}, "
        f"beta {settings.beta}, seed {settings.seed}; the same number of optimizer steps for every trainer. Time is "
        "trainer construction plus `train()`: reference passes (at the eval batch of the table; ours into an empty "
        "cache directory) and any compilation and warm-up are included.",
        "- Trainers: `ours` = `RecipeDPOTrainer` as `run_training` sets it up on this device (length-grouped "
        f"batches; the device defaults of its `null` settings: `{DEVICE_DEFAULTS[device]}`; cached reference "
        "log-probs, LM head over the scored positions only)."
        + (f" Ours' settings beyond its device defaults: `{settings.ours_training}`." if settings.ours_training else "")
        + "".join(f" `{name}` = ours with `{variant}`." for name, variant in settings.variants.items())
        + " `trl` = plain `trl.DPOTrainer` 1.16 with its defaults and gradient "
        "checkpointing off (reference model run at every step). `trl_precompute` = the same with "
        "`precompute_ref_log_probs=True`. Plain TRL is subclassed only to skip `_prepare_dataset`, so it takes the "
        "same pre-tokenized `prompt_ids/chosen_ids/rejected_ids`; its compute path is TRL's own.",
        "- Padding: share of the positions of one epoch of training batches that are padding. Head padding (ours): "
        "share of the LM head's scored-position slots that are bucket padding. Steady step: median wall time between "
        "optimizer steps in the last epoch, without device synchronisation. Kernel time/step: device kernel time per "
        "training step from torch.profiler over a few steps after the timed run (CUDA only).",
        "- Real tokens/s counts each pair's non-pad tokens as [prompt, chosen] + [prompt, rejected], the same for "
        "every trainer (work done, not positions computed). Positions/pair and padding come from one epoch of each "
        "trainer's own training batches (ours: one row per pair, holding the prompt once; TRL: two rows per pair).",
        f"- Peak memory: {memory_kind}.",
        f"- Evaluation: `trainer.evaluate()` on the {settings.eval_pairs} evaluation pairs after training, at the "
        "eval batch of the table, both scored against the initial weights: plain TRL runs its reference "
        "model next to the policy; ours first fills its reference cache (cold), then scores the policy.",
    ]
    if settings.peak_flops:
        lines.append(
            f"- MFU = (6·N·training tokens + 2·N·reference-forward tokens) / time / {settings.peak_flops:.3g} FLOP/s, "
            "N = parameters (tied embeddings once), tokens = non-pad positions each trainer's passes process "
            "(ours: prompt once per pair; trl: reference every step; precompute variants: reference once)."
        )
    # Its own parts of the file only: the other benchmarks' sections (data preparation, memory) stay as they are.
    replace_title_block(path, lines)
    replace_section(path, "## Results", table)
    sections = {
        "## Runs that failed": [f"- {failure}" for failure in failures],
        "## Loss agreement": [
            f"The first {settings.agreement_steps} optimizer steps, ours with length grouping off (the same sampler "
            "and data order as TRL) and everything else on, against plain TRL with a live reference:",
            "",
            *agreement,
        ] if agreement else [],
    }  # fmt: skip
    for heading, body in sections.items():
        if body:
            replace_section(path, heading, body)
        else:
            remove_section(path, heading)
