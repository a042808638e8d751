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
GPU: CUDA adds its context, workspaces and the caching allocator's fragmentation on top. `bench_memory_report` runs
both and writes the results.
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
