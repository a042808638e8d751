"""Memory of one DPO training step per setting (full fine-tune in fp32 or bf16 weights, LoRA, QLoRA), counted by torch.

Two ways, checked against each other:
- measured: tiny Llama models on this CPU, real tensors, built through the recipe's own loading path (`build_model`
  from a saved model directory, `peft_config_for`, bitsandbytes' 4-bit layers, the adapter set up as TRL does), one
  steady-state step (forward, backward, optimizer step) of `score_pairs` and the DPO loss. Persistent state is summed
  tensor by tensor (weights with any quantized storage and constants, gradients, optimizer state); the step's peak
  comes from torch's `MemTracker` (every allocation and free the step makes, by kind) and, as a cross-check, from the
  process's own peak resident memory (VmHWM, reset before the step), in a fresh process per setting.
- counted: the same step on fake tensors (`FakeTensorMode`: shapes and dtypes, no storage) at the real shapes of
  the models people fine-tune, counted by the same `MemTracker`. Fake mode cannot quantize, so QLoRA is counted as a
  bf16 base prepared as `prepare_model_for_kbit_training` leaves it (embeddings, head and norms fp32) with bf16
  adapters, and its quantized linear weights are then charged at the bytes per weight measured on the tiny models.
The first is a measurement; the second an exact count of what torch allocates for that step, not a measurement on a
GPU: CUDA adds its context, workspaces and the caching allocator's fragmentation on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .config import LoraConfig, ModelConfig, QuantizationConfig
from .loss import resolve_loss
from .models import build_model, peft_config_for
from .packing import install_scoring_head, make_collator, pair_logps

# LlamaConfig / Qwen2Config keyword arguments. Tiny ones are measured here; real ones are counted on fake tensors.
TINY_SHAPES = {
    "tiny-7m": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 16384, "tie_word_embeddings": True},
    "tiny-35m": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6,
                 "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 16384, "tie_word_embeddings": False},
    # for the tests: the command end to end in seconds
    "tiny-test": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": True},
}
REAL_SHAPES = {
    # Qwen/Qwen2.5-0.5B config.json (biases on q/k/v_proj, which Qwen2Config sets itself)
    "0.5B": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    # meta-llama/Llama-3.2-1B config.json
    "1B": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    # meta-llama/Llama-3.2-3B config.json
    "3B": {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    # meta-llama/Llama-3.1-8B config.json
    "8B": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
}
GIB = 1024**3
LORA = LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
QLORA = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bf16")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    label: str
    dtype: str  # model.dtype
    lora: bool = False
    quantized: bool = False


SETTINGS = {
    s.name: s
    for s in (
        Setting("full_fp32", "full fine-tune, fp32 weights", "fp32"),
        Setting("full_bf16", "full fine-tune, bf16 weights", "bf16"),
        Setting("lora_fp32", "LoRA r=16 all-linear, fp32 base", "fp32", lora=True),
        Setting("lora_bf16", "LoRA r=16 all-linear, bf16 base", "bf16", lora=True),
        Setting("qlora", "QLoRA: 4-bit NF4 base, double quant, LoRA r=16, bf16 compute", "bf16", lora=True, quantized=True),
    )
}


@dataclasses.dataclass(frozen=True)
class Batch:
    """A training micro-batch of `pairs` pairs, each a prompt and two responses of fixed lengths. In the separate
    layout (TRL's, and the recipe's default on a GPU) that is 2 x pairs rows of prompt + response tokens."""

    pairs: int = 16
    prompt: int = 128
    response: int = 128
    share_prompt: bool = False

    def describe(self) -> str:
        rows = f"{2 * self.pairs} rows of {self.prompt + self.response}" if not self.share_prompt else (
            f"{self.pairs} shared-prompt rows of {self.prompt + 2 * self.response + 1}")
        return f"{self.pairs} pairs x (prompt {self.prompt} + response {self.response}) tokens: {rows} tokens"


def model_config(shape: dict):
    from transformers import AutoConfig

    kwargs = dict(shape)
    return AutoConfig.for_model(kwargs.pop("model_type"), max_position_embeddings=4096, **kwargs)


def parameter_count(shape: dict) -> int:
    """Parameters of the plain model (tied embeddings once), from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    return sum(p.numel() for p in model.parameters())


def _storages(tensors) -> dict[int, int]:
    """{storage id: bytes}, each storage once (views and tied weights share one)."""
    found = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            found[storage._cdata] = storage.nbytes()
    return found


def quantization_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """bitsandbytes' quantization constants, which live beside the packed weights, not in the state dict."""
    tensors = []
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        while state is not None:  # double quantization nests a second state for the constants' own constants
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
        scale = getattr(parameter, "SCB", None)  # 8-bit layers
        if isinstance(scale, torch.Tensor):
            tensors.append(scale)
    return tensors


def quantization_storage(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the quantized layers: `per_weight` grows with their weights (the packed 4-bit codes, one 8-bit
    constant per block of 64, one fp32 constant per 256 of those), `per_layer` does not (each layer's lookup tables)."""
    per_weight, per_layer, layers = {}, {}, 0
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        if state is None:
            continue
        layers += 1
        per_weight |= _storages([parameter])
        while state is not None:
            per_weight |= _storages([state.absmax])
            per_layer |= _storages([state.code, getattr(state, "offset", None)])
            state = getattr(state, "state2", None)
    return {"per_weight": sum(per_weight.values()), "per_layer": sum(per_layer.values()), "layers": layers}


def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers(), *quantization_tensors(model)]


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Weights (every parameter and buffer, quantized storage and its constants included), gradients and optimizer
    state, each storage counted once."""
    weights = _storages(weight_tensors(model))
    optimizer_tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {
        "weights": sum(weights.values()),
        "buffers": sum(_storages(model.buffers()).values()),  # inside weights: RoPE frequencies, not parameters
        "trainable": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "gradients": sum(_storages(p.grad for p in model.parameters()).values()),
        "optimizer": sum(_storages(optimizer_tensors).values()),
    }


def peft_model(model: torch.nn.Module, quantized: bool) -> torch.nn.Module:
    """The adapter as trl.DPOTrainer 1.16 sets it up from the recipe's `peft_config_for` (dpo_trainer.py, "Create
    PEFT model" and its QLoRA bf16 cast): PEFT keeps adapters in fp32 on a bf16 base; on a quantized base TRL casts
    them to bf16."""
    from peft import get_peft_model

    model = get_peft_model(model, peft_config_for(model, LORA))
    if quantized:
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "lora_magnitude_vector" not in name:
                parameter.data = parameter.data.to(torch.bfloat16)
    return model


def emulate_kbit_preparation(model: torch.nn.Module) -> None:
    """What `prepare_model_for_kbit_training` does to the parameters a 4-bit load leaves unquantized (embeddings,
    head, norms): casts them to fp32 and freezes everything. For fake tensors, which bitsandbytes cannot quantize."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        if parameter.ndim < 2 or parameter is model.get_output_embeddings().weight or parameter is model.get_input_embeddings().weight:
            parameter.data = parameter.data.float()


def quantized_linears(shape: dict) -> tuple[int, int]:
    """(weights, layers) of the linear layers a 4-bit load quantizes: every nn.Linear but the output head."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return sum(m.weight.numel() for m in linears), len(linears)


def save_tiny_model(shape_name: str, directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model saved as a model directory, for `build_model` to load like any checkpoint."""
    from transformers import AutoModelForCausalLM

    path = directory / shape_name
    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(model_config(TINY_SHAPES[shape_name])).save_pretrained(path)
    return path


def build_measured_model(setting: Setting, path: Path) -> torch.nn.Module:
    """The recipe's path: `build_model` from a model directory (dtype, bitsandbytes quantization and k-bit
    preparation), then the adapter."""
    config = ModelConfig(
        name_or_path=str(path), dtype=setting.dtype, quantization=QLORA if setting.quantized else None,
        lora=LORA if setting.lora else None,
    )
    model = build_model(config, tokenizer=None, seed=0, max_length=512)
    return peft_model(model, setting.quantized) if setting.lora else model


def build_fake_model(setting: Setting, shape: dict, fake_mode) -> torch.nn.Module:
    """The same model on fake tensors on the CPU; QLoRA as described in the module docstring.

    Built on the meta device and only then made fake: PEFT moves each new adapter with `.to()`, which cannot swap a
    fake parameter in place."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if setting.dtype == "fp32" else torch.bfloat16)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(shape))
    finally:
        torch.set_default_dtype(previous)
    if setting.quantized:
        emulate_kbit_preparation(model)
    model = peft_model(model, setting.quantized) if setting.lora else model
    with fake_mode:
        model.to_empty(device="cpu")
    base = model.get_base_model() if setting.lora else model
    if base.config.tie_word_embeddings:  # to_empty gave the head and the embedding a tensor each
        base.get_output_embeddings().weight = base.get_input_embeddings().weight
    return model


def optimizer_for(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    """The optimizer transformers' Trainer builds for `optim` (the recipe's `training.optim`), over the trainable
    parameters."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as scratch:
        arguments = TrainingArguments(output_dir=scratch, optim=name, use_cpu=True, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(arguments, model)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def make_batch(batch: Batch, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The recipe's collated batch of synthetic pairs with cached reference log-probs, as a training step gets it."""
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(1, vocab_size) for _ in range(n)]  # noqa: E731
    pairs = [
        {"prompt_ids": tokens(batch.prompt), "chosen_ids": tokens(batch.response), "rejected_ids": tokens(batch.response),
         "ref_chosen_logps": -1.0, "ref_rejected_logps": -1.5}
        for _ in range(batch.pairs)
    ]
    return make_collator(pad_token_id=0, share_prompt=batch.share_prompt, pad_to_multiple_of=1, length_buckets=0)(pairs)


def training_step(model, optimizer, batch: dict, autocast: bool) -> None:
    """One DPO step as the recipe's trainer takes it: `score_pairs` (LM head over the scored positions only), the
    sigmoid loss against cached reference log-probs (no reference model is held), backward, optimizer step, and the
    gradients freed (Trainer's `zero_grad(set_to_none=True)`)."""
    loss_fn = resolve_loss("sigmoid")
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        chosen, rejected = pair_logps(model, batch)
        losses, _, _ = loss_fn(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], 0.1)
        loss = losses.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def gpu_head_kernels(enabled: bool):
    """On fake tensors, count the LM head as TRL's chunked kernel runs on a GPU: its Triton folds and the fp32
    `addmm(out_dtype=...)` write into buffers allocated beforehand, where the CPU fallback (`_forward_tile`,
    `_backward_tile`, `_addmm_fp32` upcasting both operands) allocates tile- and chunk-sized temporaries. Fake
    tensors hold no values, so leaving those calls out changes only the count of what they would allocate."""
    if not enabled:
        yield
        return
    from trl.kernels import chunked_logprob

    names = ("_forward_tile", "_backward_tile", "_addmm_fp32")
    saved = {name: getattr(chunked_logprob, name) for name in names}
    for name in names:
        setattr(chunked_logprob, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(chunked_logprob, name, function)


def prepare_for_training(model: torch.nn.Module, checkpointing: bool) -> None:
    model.train()
    if checkpointing:  # as Trainer does for `gradient_checkpointing: true` (transformers' default: non-reentrant)
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads") and hasattr(model, "peft_config"):
            model.enable_input_require_grads()  # TRL does this for PEFT models
    install_scoring_head(model)


class _NoHook:
    def remove(self) -> None:
        pass


def tracked_step(model, optimizer, batch: dict, autocast: bool) -> dict[str, int]:
    """Peak memory of the forward and backward of one steady-state step (optimizer state already allocated), by kind,
    as torch's MemTracker saw it: weights (parameters, buffers, quantization constants), optimizer state, gradients
    so far, and activations with the backward's temporaries, at the moment the total peaked. The optimizer step then
    runs untracked: it holds weights, every gradient and the optimizer state (`state_bytes`), and the fused and
    per-tensor AdamW add no full-size temporaries."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer, *quantization_tensors(model))
    # MemTracker hooks every parameter's gradient, which a frozen one refuses; it skips a parameter it has hooked.
    no_hook = _NoHook()
    for parameter in model.parameters():
        if not parameter.requires_grad:
            tracker._param_to_grad_hook_handles[parameter] = (no_hook, no_hook)
    loss_fn = resolve_loss("sigmoid")
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with tracker:
        with context:
            chosen, rejected = pair_logps(model, batch)
            loss = loss_fn(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], 0.1)[0].mean()
        loss.backward()
        del chosen, rejected, loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {
        "peak": peak["Total"],
        "weights": peak["Parameter"] + peak["Buffer"] + peak["Other"],
        "optimizer": peak["Optstate"],
        "gradients": peak["Gradient"],
        "activations": peak["Activation"] + peak["Temp"],
    }


def step_peak(run: dict) -> tuple[int, int]:
    """(peak of the whole step, the activations held at that moment): the larger of the forward/backward peak and
    the optimizer step's weights + gradients + optimizer state."""
    tracked, state = run["tracked"], run["state"]
    at_step = state["weights"] + state["gradients"] + state["optimizer"]
    return (tracked["peak"], tracked["activations"]) if tracked["peak"] >= at_step else (at_step, 0)


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_step(model, optimizer, batch: dict, autocast: bool) -> int | None:
    """What one step adds to the process's resident memory at its peak: VmHWM is reset (clear_refs 5) just before."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_bytes("VmRSS")
    except OSError:
        return None  # not Linux, or not allowed: the tracker's figure stands alone
    training_step(model, optimizer, batch, autocast)
    return _rss_bytes("VmHWM") - before


def measure(setting: Setting, shape_name: str, batch: Batch, checkpointing: bool, autocast: bool, optim: str,
            fake: bool, model_dir: Path | None = None, layers: int | None = None) -> dict:
    """One setting on one shape (`layers` deep, fake tensors only, else the shape's own depth): persistent state after
    a first step, then the tracked peak of a second one (and on real tensors, before it, the resident-memory peak of
    another)."""
    shape = {**TINY_SHAPES, **REAL_SHAPES}[shape_name]
    if layers is not None:
        shape = {**shape, "num_hidden_layers": layers}
    mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = build_fake_model(setting, shape, mode) if fake else build_measured_model(setting, model_dir)
    gpu = fake and autocast  # the real-shape count, of the recipe as it runs on a GPU
    torch.manual_seed(0)
    inputs = make_batch(batch, shape["vocab_size"])  # real tensors: the collator finds scored positions on the host
    with mode, gpu_head_kernels(gpu):
        prepare_for_training(model, checkpointing)
        optimizer = optimizer_for(model, optim)
        loss_fn = resolve_loss("sigmoid")
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:  # the first step by hand, to read the gradients before the optimizer frees them
            chosen, rejected = pair_logps(model, inputs)
            loss = loss_fn(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], 0.1)[0].mean()
        loss.backward()
        optimizer.step()
        state = state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        result = {
            "setting": setting.name, "shape": shape_name, "layers": shape["num_hidden_layers"],
            "checkpointing": checkpointing, "autocast": autocast,
            "fake": fake, "optim": optim, "parameters": parameter_count(shape),
            "quantized_linear": quantized_linears(shape)[0], "quantized_layers": quantized_linears(shape)[1],
            "quantization": None if fake else quantization_storage(model),
            "state": state,
            "rss_step": None if fake else rss_step(model, optimizer, inputs, autocast),
            "tracked": tracked_step(model, optimizer, inputs, autocast),
        }
    return result


def measure_in_fresh_process(**kwargs) -> dict:
    """`measure` in a new Python process, so its resident-memory peak is its own."""
    arguments = {**kwargs, "batch": dataclasses.asdict(kwargs["batch"]), "model_dir": str(kwargs.get("model_dir"))}
    code = (
        "import json, sys; from pathlib import Path; from dpo_recipe import bench_memory as m; a = json.loads(sys.argv[1]); "
        "a['setting'] = m.SETTINGS[a['setting']]; a['batch'] = m.Batch(**a['batch']); a['model_dir'] = Path(a['model_dir']); "
        "print('RESULT ' + json.dumps(m.measure(**a)))"
    )
    arguments["setting"] = kwargs["setting"].name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"measuring {arguments['setting']} on {arguments.get('shape_name')} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---- the benchmark: measured tiny runs, counted real shapes, and the table ---------------------------------------

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


def replace_section(path: Path, heading: str, body: list[str]) -> None:
    """Put `heading` and `body` into the markdown file in place of that section (up to the next `## `), or at its
    end; the other sections stay as they are."""
    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    section = [heading, "", *body]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section + ([""] if end < len(lines) else [])
    else:
        lines += ([""] if lines else []) + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


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
