"""The memory benchmark around `bench_memory`'s counts: tiny models measured and counted, real shapes counted at two
depths and extended to their own, QLoRA's storage charged, and the results section with the table of what fits."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from .bench_memory import (
    GIB, REAL_SHAPES, SETTINGS, TINY_SHAPES, Batch, measure, measure_in_fresh_process, save_tiny_model, step_peak,
)
from .results_file import replace_section

MEASURED_BATCH = Batch(pairs=4)  # 8 rows of 256: a step of the larger tiny model stays near a minute on a 2-core CPU
TABLE_BATCH = Batch(pairs=16)  # 32 rows of 256, the README's micro-batch
TABLE_SETTINGS = ("full_fp32", "full_bf16", "lora_bf16", "qlora")
RESULTS_HEADING = "## Memory per setting (issue 21)"
DEPTHS = (2, 3)  # real shapes are counted at these depths and extended to their own (`at_depth`)
DEPTH_CHECKS = (("1B", "full_bf16", False), ("1B", "qlora", True))  # also counted at full depth, to check that


def run_key(setting: str, shape: str, checkpointing: bool, fake: bool, batch: Batch, autocast: bool, optim: str,
            layers: int | None = None) -> str:
    depth = "" if layers is None else f"-L{layers}"
    return (f"{'counted' if fake else 'measured'}-{shape}{depth}-{setting}-gc{int(checkpointing)}-ac{int(autocast)}-{optim}"
            f"-{batch.pairs}x{batch.prompt}+{batch.response}{'s' if batch.share_prompt else ''}")


def cached_run(cache: Path, fresh: bool, **kwargs) -> dict:
    """One `measure`, real-tensor runs in a fresh process, kept as JSON under `cache` so a rerun skips it."""
    key = run_key(kwargs["setting"].name, kwargs["shape_name"], kwargs["checkpointing"], kwargs["fake"],
                  kwargs["batch"], kwargs["autocast"], kwargs["optim"], kwargs.get("layers"))
    path = cache / f"{key}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    print(f"memory: {key}", flush=True)
    result = measure(**kwargs) if kwargs["fake"] else measure_in_fresh_process(**kwargs)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def at_depth(shallow: dict, deeper: dict, layers: int) -> dict:
    """A run's figures at `layers` decoder layers from runs at two depths: every count (state, the forward/backward
    peak and its parts) is linear in the number of identical layers, since the peak falls at the same point of the
    step (checked against full-depth counts and measurements in the results)."""
    step = deeper["layers"] - shallow["layers"]

    def line(a, b):
        if isinstance(a, dict):
            return {key: line(a[key], b[key]) for key in a}
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            return a
        return round(a + (b - a) * (layers - shallow["layers"]) / step)

    run = line(shallow, deeper)
    run["layers"] = layers
    return run


def quantized_storage(measured: dict) -> tuple[float, float]:
    """(bytes per quantized weight, bytes per quantized layer) of a real QLoRA load."""
    storage = measured["quantization"]
    return storage["per_weight"] / measured["quantized_linear"], storage["per_layer"] / storage["layers"]


def with_quantized_storage(run: dict, storage: tuple[float, float]) -> dict:
    """A fake-tensor QLoRA run with its quantized linear weights charged as `storage` says instead of as bf16."""
    per_weight, per_layer = storage
    saving = round(run["quantized_linear"] * (2.0 - per_weight) - run["quantized_layers"] * per_layer)
    run = json.loads(json.dumps(run))
    run["state"]["weights"] -= saving
    run["tracked"]["weights"] -= saving
    run["tracked"]["peak"] -= saving
    return run


@dataclasses.dataclass
class MemorySettings:
    tiny_shapes: tuple[str, ...] = ("tiny-7m", "tiny-35m")
    settings: tuple[str, ...] = tuple(SETTINGS)
    real_shapes: tuple[str, ...] = tuple(REAL_SHAPES)
    measured_batch: Batch = MEASURED_BATCH
    table_batch: Batch = TABLE_BATCH
    cache: str = "benchmarks/.memory_runs"
    fresh: bool = False
    output: str | None = "benchmarks/results.md"
    command: str = "python scripts/bench_memory.py"
    note: str | None = None  # how loaded the machine was, for the results
    # Assumed, not measured: CUDA context, cuBLAS/attention workspaces and caching-allocator slack on a GPU.
    cuda_overhead_gib: float = 1.5


def measured_runs(settings: MemorySettings, model_dir: Path) -> list[tuple[dict, dict, dict]]:
    """(measured, counted, counted at `DEPTHS` layers and extended to the model's) for every setting on every tiny shape, real tensors against fake, CPU defaults (fp32
    autocast off, `adamw_torch`); full fp32 with gradient checkpointing as well."""
    pairs = []
    for shape in settings.tiny_shapes:
        path = save_tiny_model(shape, model_dir)
        checkpointed = [("full_fp32", True)] if "full_fp32" in settings.settings else []
        for name, checkpointing in [*((name, False) for name in settings.settings), *checkpointed]:
            common = dict(setting=SETTINGS[name], shape_name=shape, batch=settings.measured_batch,
                          checkpointing=checkpointing, autocast=False, optim="adamw_torch")
            measured = cached_run(Path(settings.cache), settings.fresh, fake=False, model_dir=path, **common)
            counted = cached_run(Path(settings.cache), settings.fresh, fake=True, **common)
            extended = at_depth(*(cached_run(Path(settings.cache), settings.fresh, fake=True, layers=layers, **common)
                                  for layers in DEPTHS), TINY_SHAPES[shape]["num_hidden_layers"])
            pairs.append((measured, counted, extended))
    return pairs


def depth_checks(settings: MemorySettings, storage: tuple[float, float] | None) -> list[str]:
    """Full-depth counts of a real shape against the same extended from `DEPTHS` (how the table is made)."""
    lines = []
    for shape, name, checkpointing in DEPTH_CHECKS:
        if shape not in settings.real_shapes or name not in table_settings(settings, storage):
            continue
        common = dict(setting=SETTINGS[name], shape_name=shape, batch=settings.table_batch,
                      checkpointing=checkpointing, autocast=True, optim="adamw_torch_fused", fake=True)
        full = cached_run(Path(settings.cache), settings.fresh, **common)
        extended = at_depth(*(cached_run(Path(settings.cache), settings.fresh, layers=layers, **common)
                              for layers in DEPTHS), REAL_SHAPES[shape]["num_hidden_layers"])
        if SETTINGS[name].quantized:
            full, extended = (with_quantized_storage(run, storage) for run in (full, extended))
        (a, _), (b, _) = step_peak(full), step_peak(extended)
        lines.append(f"{shape} {name}, checkpointing {'on' if checkpointing else 'off'}: {_gib(a)} GiB counted at "
                     f"full depth, {_gib(b)} GiB extended from {DEPTHS[0]} and {DEPTHS[1]} layers ({b / a - 1:+.2%})")
    return lines


def counted_runs(settings: MemorySettings, storage: tuple[float, float] | None) -> dict[tuple[str, str, bool], dict]:
    """Each table setting on each real shape, with and without gradient checkpointing, as the recipe runs on a GPU:
    bf16 autocast (`training.precision: auto`), fused AdamW (`training.optim: null`)."""
    runs = {}
    for shape in settings.real_shapes:
        for name in table_settings(settings, storage):
            for checkpointing in (False, True):
                shallow, deeper = (
                    cached_run(Path(settings.cache), settings.fresh, setting=SETTINGS[name], shape_name=shape,
                               batch=settings.table_batch, checkpointing=checkpointing, autocast=True,
                               optim="adamw_torch_fused", fake=True, layers=layers)
                    for layers in DEPTHS
                )
                run = at_depth(shallow, deeper, REAL_SHAPES[shape]["num_hidden_layers"])
                if SETTINGS[name].quantized:
                    run = with_quantized_storage(run, storage)
                runs[shape, name, checkpointing] = run
    return runs


def table_settings(settings: MemorySettings, storage: tuple[float, float] | None) -> list[str]:
    """The table's settings among those asked for; QLoRA only with its storage measured."""
    return [n for n in TABLE_SETTINGS if n in settings.settings and (n != "qlora" or storage)]


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def state_line(run: dict) -> str:
    state, n = run["state"], run["parameters"]
    total = state["weights"] + state["gradients"] + state["optimizer"]
    return (f"{state['weights'] / n:.2f} | {state['gradients'] / n:.2f} | {state['optimizer'] / n:.2f} | "
            f"**{total / n:.2f}**")


def measured_table(pairs: list[tuple[dict, dict, dict]]) -> list[str]:
    lines = [
        "| model | setting | checkpointing | weights | gradients | optimizer | **state, bytes/param** | trainable weights | "
        "step peak, measured (MiB) | counted on fake tensors | difference | counted at 2 and 3 layers, extended | "
        "difference | step's RSS growth / tracked growth |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for measured, counted, extended in pairs:
        peak, counted_peak, extended_peak = (step_peak(run)[0] for run in (measured, counted, extended))
        growth = peak - measured["state"]["weights"] - measured["state"]["optimizer"]  # what the step adds
        rss = "-" if measured["rss_step"] is None else f"{measured['rss_step'] / growth:.2f}"
        error = counted_peak / peak - 1
        lines.append(
            f"| {measured['shape']} ({measured['parameters'] / 1e6:.1f}M) | {measured['setting']} | "
            f"{'on' if measured['checkpointing'] else 'off'} | {state_line(measured)} | "
            f"{measured['state']['trainable'] / measured['parameters']:.2f} | {_mib(peak)} | "
            f"{_mib(counted_peak)} | {error:+.1%} | {_mib(extended_peak)} | {extended_peak / peak - 1:+.1%} | {rss} |"
        )
    return lines


def fits(peak: int, overhead_gib: float) -> str:
    return " ".join("✓" if peak / GIB + overhead_gib <= capacity else "✗" for capacity in (24, 48, 80))


def table_rows(runs: dict, settings: MemorySettings) -> list[str]:
    lines = [
        "| model | setting | weights + optimizer (GiB) | peak, no checkpointing (GiB) | activations' share | fits 24 / 48 / 80 | "
        "peak, gradient checkpointing (GiB) | activations' share | fits 24 / 48 / 80 |",
        "|---|---|---:|---:|---:|:---:|---:|---:|:---:|",
    ]
    for shape in settings.real_shapes:
        for name in [n for n in TABLE_SETTINGS if (shape, n, False) in runs]:
            plain, checkpointed = runs[shape, name, False], runs[shape, name, True]
            persistent = plain["state"]["weights"] + plain["state"]["optimizer"]
            cells = []
            for run in (plain, checkpointed):
                peak, activations = step_peak(run)
                cells += [f"**{_gib(peak)}**", f"{activations / peak:.0%}", fits(peak, settings.cuda_overhead_gib)]
            lines.append(f"| {shape} ({plain['parameters'] / 1e9:.2f}B) | {SETTINGS[name].label} | {_gib(persistent)} | " + " | ".join(cells) + " |")
    return lines


def run_memory_benchmark(settings: MemorySettings, machine: dict[str, str]) -> list[str]:
    """Measure, count, and return (and write into `settings.output`) the results section."""
    with tempfile.TemporaryDirectory() as scratch:
        pairs = measured_runs(settings, Path(scratch))
    qlora = [m for m, _, _ in pairs if m["setting"] == "qlora"]
    storage = {m["shape"]: quantized_storage(m) for m in qlora}
    largest = qlora[-1]["shape"] if qlora else None
    pairs = [(m, *(with_quantized_storage(run, storage[m["shape"]]) for run in rest)) if m["setting"] == "qlora"
             else (m, *rest) for m, *rest in pairs]
    runs = counted_runs(settings, storage.get(largest))
    checks = depth_checks(settings, storage.get(largest))
    storage_line = ""
    if qlora:
        per_weight, per_layer = storage[largest]
        storage_line = (f"QLoRA storage, measured on {largest}: {per_weight:.4f} bytes per quantized weight (4-bit codes, "
                        f"an 8-bit constant per block of 64, an fp32 constant per 256 of those) and {per_layer:,.0f} "
                        "bytes per quantized layer (lookup tables); fake-tensor QLoRA runs (counted columns above, "
                        "table below) are charged that instead of bf16.")
        if len(storage) > 1:
            small = qlora[0]["shape"]
            storage_line += (f" {small} gives {storage[small][0]:.4f} bytes per weight and {storage[small][1]:,.0f} "
                             "per layer.")
    overhead = settings.cuda_overhead_gib
    body = [
        f"Command: `{settings.command}`",
        "",
        "Hardware and software: " + "; ".join(f"{key}: {value}" for key, value in machine.items()),
        "",
        *([settings.note, ""] if settings.note else []),
        "**Measured** (tiny Llama models from `LlamaConfig`, this CPU, real tensors; `dpo_recipe.bench_memory`): each "
        "setting loaded through the recipe's own path (`build_model` from a saved model directory with `model.dtype`, "
        "bitsandbytes 4-bit NF4 with double quantization and `prepare_model_for_kbit_training` for QLoRA, "
        "`peft_config_for` with r=16 `all-linear` and the adapter set up as `trl.DPOTrainer` 1.16 sets it up: fp32 "
        "adapters on a bf16 base, bf16 adapters on a 4-bit one), then DPO steps as the recipe's trainer takes them "
        "(`score_pairs`: the LM head over the scored positions only; the sigmoid loss against cached reference "
        "log-probs; backward; the optimizer `training.optim: null` gives on CPU, `adamw_torch`; gradients freed) on "
        f"{settings.measured_batch.describe()}, fp32 autocast off (the CPU default). State is summed tensor by tensor "
        "after the first step (every parameter and buffer, 4-bit storage and its quantization constants, gradients, "
        "optimizer state), per parameter of the plain model (tied embeddings once). The step peak is that of a second, "
        "steady-state step as torch's `MemTracker` (`torch.distributed._tools.mem_tracker`) saw every allocation "
        "and free; it is then counted again on fake tensors (below) to check that method. The last column is the "
        "process's own peak resident memory during a step (VmHWM reset just before; each setting in a fresh process) "
        "over what the tracker says the step allocates beyond weights and optimizer state: a cross-check by the OS.",
        "",
        *measured_table(pairs),
        "",
        *([storage_line, ""] if qlora else []),
        "**Counted** (real shapes on fake tensors, the table below): the configs of Qwen2.5-0.5B, Llama-3.2-1B, "
        "Llama-3.2-3B and Llama-3.1-8B (hidden size, layers, heads, KV heads, MLP size, vocabulary, tied embeddings: "
        "`REAL_SHAPES` in `bench_memory.py`) built on fake tensors (`FakeTensorMode`: shapes and dtypes, no storage) "
        "and run through the same step under the same `MemTracker`, as the recipe runs on a GPU: bf16 autocast "
        "(`training.precision: auto`), fused AdamW (`training.optim: null`), separate chosen/rejected rows (the GPU "
        f"default), {settings.table_batch.describe()}; the LM head as TRL's chunked kernel runs there (Triton folds "
        "writing into its preallocated tile; the CPU fallback's tile-sized temporaries are left out), its fp32 "
        "gradient accumulators included. Each shape is counted at 2 and 3 decoder layers and extended linearly to its "
        "own depth (every count is linear in the number of identical layers); the tiny table's extended column and "
        "the full-depth checks below show how close that is. Fake tensors cannot be quantized, so QLoRA is the fake run of a "
        "bf16 base with `prepare_model_for_kbit_training`'s fp32 embeddings, head and norms and bf16 adapters, its "
        "linear weights then charged at the storage measured above. The tiny table "
        "shows how far such a count is from the real run. Activations' share: activations and backward temporaries "
        "(`MemTracker`'s Activation + Temp) at the moment of the peak; 0% where the peak is the optimizer step, "
        "which holds every gradient at once. LoRA's adapter dropout (0.05) keeps a dropped copy of each adapted "
        "layer's input for the backward, which is why LoRA without checkpointing can hold more activations than a "
        "full fine-tune. Fits: peak plus an assumed "
        f"{overhead} GiB (CUDA context, cuBLAS and attention workspaces, allocator slack: not measured here) within "
        "24, 48, 80 GiB.",
        "",
        *(table_rows(runs, settings) if runs else ["(no real shapes counted in this run)"]),
        "",
        *(["Depth extension checked against full-depth counts: " + "; ".join(checks) + ".", ""] if checks else []),
        "No reference model is held: the recipe caches reference log-probs before training. Plain `trl.DPOTrainer` "
        "with its defaults keeps a second copy of the weights for the reference (full fine-tune; with LoRA it runs "
        "the base with the adapter off, no copy), which adds 2 bytes per parameter in bf16 and 4 in fp32 to every "
        "full fine-tune figure above, plus the reference forward's transient activations.",
    ]
    if settings.output:
        replace_section(Path(settings.output), RESULTS_HEADING, body)
    return [RESULTS_HEADING, "", *body]
