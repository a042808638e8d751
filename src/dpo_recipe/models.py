"""Tokenizers and models: from the hub or a local directory (what users run), or built locally (offline runs)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .config import ConfigError, ModelConfig, looks_like_local_path

LOCAL_BPE = "local-bpe"
EOS_TOKEN = "<|endoftext|>"


def train_local_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on the given texts: deterministic, and nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def cached_local_tokenizer(texts: list[str], vocab_size: int, cache_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """`train_local_tokenizer`, trained once per (texts, vocabulary size) and then read back from `cache_dir`.

    The BPE trainer breaks ties between equally frequent merges in hash-map order, which differs from process to
    process (huggingface/tokenizers#1794): two processes training on the same text can get different tokenizers. So
    the ranks of one run, and runs of one config, must share a single trained tokenizer, not each train their own.
    """
    digest = hashlib.sha256(f"{vocab_size}".encode())
    for text in texts:
        digest.update(len(text).to_bytes(8, "little") + text.encode())
    path = Path(cache_dir) / "tokenizers" / digest.hexdigest()[:24]
    if not path.is_dir():
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        train_local_tokenizer(texts, vocab_size).save_pretrained(temporary)
        with contextlib.suppress(OSError):  # another process got there first: theirs is the one everybody reads
            os.rename(temporary, path)
        shutil.rmtree(temporary, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(path)


def load_tokenizer(
    config: ModelConfig, training_texts: list[str] | None = None, source: str | None = None, cache_dir: str | None = None
):
    """The run's tokenizer. `source` (a checkpoint directory) wins over the config. A `local-bpe` tokenizer is
    trained on `training_texts`, once per `cache_dir` (see `cached_local_tokenizer`)."""
    if source is None and config.tokenizer == LOCAL_BPE:
        if not training_texts:
            raise ValueError("model.tokenizer: local-bpe needs training text")
        if cache_dir is None:
            return train_local_tokenizer(training_texts, config.tokenizer_vocab_size)
        return cached_local_tokenizer(training_texts, config.tokenizer_vocab_size, cache_dir)
    name = source or config.tokenizer or config.name_or_path
    key = "checkpoint" if source else "model.tokenizer" if config.tokenizer else "model.name_or_path"
    name = _existing_directory(name, key)
    revision = config.revision if name == config.name_or_path else None  # a checkpoint or other tokenizer has none
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.trust_remote_code, revision=revision)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: cannot load tokenizer {name!r} ({str(error).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _existing_directory(name: str, key: str) -> str:
    """A name written as a path must be a directory; otherwise the hub library reports it as a malformed repo id."""
    if looks_like_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{key}: no such directory: {name}" + (" (it is a file)" if path.exists() else ""))
        return str(path)
    return name


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def weight_dtype(config: ModelConfig) -> torch.dtype | str:
    """The dtype `model.dtype` loads weights in: `auto` is the checkpoint's own on a GPU ("auto" to from_pretrained)
    and fp32 on CPU, where bf16 matmuls run hundreds of times slower."""
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    return "auto" if torch.cuda.is_available() and config.tiny is None else torch.float32


def bitsandbytes_config(config: ModelConfig):
    """transformers' BitsAndBytesConfig for `model.quantization`; one line naming the extra when it is missing."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError('model.quantization needs bitsandbytes, which is not installed: pip install -e ".[qlora]"')
    from transformers import BitsAndBytesConfig

    quantization = config.quantization
    compute = quantization.compute_dtype
    if compute == "auto":
        compute = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant, bnb_4bit_compute_dtype=DTYPES[compute],
    )


def dequantized(model: torch.nn.Module, config: ModelConfig) -> torch.nn.Module:
    """A quantized base as a plain model in `model.dtype`, so an adapter merges into full-precision weights."""
    dtype = weight_dtype(config)
    return model.dequantize(dtype=torch.float32 if dtype == "auto" else dtype)


def build_model(config: ModelConfig, tokenizer, seed: int, max_length: int, source: str | None = None):
    """The policy, with its weights in `model.dtype` (see `weight_dtype`): the dtype of the master weights, the
    gradients and the optimizer state; `training.precision` autocasts on top.

    `tiny` builds a randomly initialised GPT-2 from GPT2Config, seeded, sized to the tokenizer.
    """
    dtype = weight_dtype(config)
    if source is None and config.tiny is not None:
        torch.manual_seed(seed)
        gpt2 = GPT2Config(
            **{
                "n_positions": max(max_length, 64),
                "vocab_size": len(tokenizer),
                # The tokenizer's own ids (a local BPE has no BOS: end-of-sequence stands in), so Trainer finds
                # nothing to align and says nothing about it.
                "bos_token_id": tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                **config.tiny,
            }
        )
        model = GPT2LMHeadModel(gpt2).to(dtype)  # initialised in fp32, so every dtype starts from the same weights
        model.config._attn_implementation = config.attn_implementation
    else:
        name = _existing_directory(source or config.name_or_path, "checkpoint" if source else "model.name_or_path")
        quantization = bitsandbytes_config(config) if config.quantization is not None else None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name,
                trust_remote_code=config.trust_remote_code,
                attn_implementation=config.attn_implementation,
                dtype=dtype,
                revision=config.revision if source is None else None,
                use_safetensors=True,
                quantization_config=quantization,
            )
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.name_or_path: cannot load {name!r} ({str(error).splitlines()[0]})") from None
        except RuntimeError as error:  # bitsandbytes without a backend for this device
            if quantization is None:
                raise
            raise ConfigError(f"model.quantization: bitsandbytes cannot quantize on this device ({str(error).splitlines()[0]})") from None
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            # Freezes the quantized base and keeps its norms and embeddings in fp32; the trainer's own setting turns
            # gradient checkpointing on, or not.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise ConfigError(f"data.max_length must be <= the model's context of {context} tokens (got {max_length})")
    return model


def peft_config_for(model: torch.nn.Module, lora, origin: str = "model.lora.target_modules"):
    """PEFT's LoraConfig for the recipe's `model.lora` block on this model (any architecture), once every target
    names modules of it.

    PEFT only fails when no target matches anything, with a long traceback, and only after the run directory exists;
    a target that matches nothing, beside others that do, it would skip with a warning. `origin` is where the targets
    were set (the config file or the --set flag), for the one-line error.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    targets = lora.target_modules
    head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    linear = {name: m for name, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}

    def matching(target) -> list[torch.nn.Module]:  # PEFT's own rule: a string is a regular expression over full names
        probe = LoraConfig(target_modules=target)
        return [m for name, m in modules.items() if check_target_module_exists(probe, name)]

    if targets == "all-linear":  # PEFT's rule: every nn.Linear / Conv1D but the output head
        found = {targets: list(linear.values())}
    elif isinstance(targets, str):
        found = {targets: matching(targets)}
    else:
        found = {target: matching([target]) for target in targets}
    unmatched = [target for target, targeted in found.items() if not targeted]
    if unmatched:
        raise ConfigError(
            f"{origin}: model.lora.target_modules {', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} "
            f"no module of this model; its linear layers are {', '.join(dict.fromkeys(n.split('.')[-1] for n in linear))}"
        )
    # GPT-2 stores its projections transposed (Conv1D); PEFT must know, or it warns and flips the flag itself.
    transposed = any(isinstance(module, Conv1D) for targeted in found.values() for module in targeted)
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, fan_in_fan_out=transposed,
        use_dora=lora.use_dora, use_rslora=lora.use_rslora, modules_to_save=lora.modules_to_save, task_type="CAUSAL_LM",
    )


# Config entries that name or describe a model without changing what it computes.
CONFIG_METADATA = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "_commit_hash")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the function a reference pass computes: the architecture, attention implementation and weights.

    Weights alone miss whatever is not a tensor of the state dict: head count, activation, layer-norm eps, RoPE
    settings (`inv_freq` is a buffer outside it), the attention kernel. LoRA adapter weights are left out (the
    reference pass runs with the adapter disabled).
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_METADATA}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(f"attention:{model.config._attn_implementation}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        # A PEFT wrapper renames the base weights; normalise so a LoRA run and a plain eval share one key.
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        tensor = tensor.detach().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.float().numpy().tobytes() if tensor.dtype == torch.bfloat16 else tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_precision(precision: str, source: str) -> str:
    has_bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if has_bf16_gpu else "fp32"
    if precision == "bf16" and not has_bf16_gpu:
        raise ConfigError(f"{source}: training.precision bf16 needs a GPU that supports it (use auto or fp32)")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(f"{source}: training.precision fp16 needs a GPU (use auto or fp32)")
    return precision


def restore_adapter_dropout(model: torch.nn.Module) -> None:
    """Give each LoRA adapter of a PEFT model its configured dropout back.

    TRL's `disable_dropout` (on by default) sets every `nn.Dropout` to 0, so that log-probs do not depend on a random
    draw. That reaches the adapter's own dropout too, which belongs to the LoRA method (`model.lora.dropout`) rather
    than to the model, and would then be 0 while the adapter config saved with the run says otherwise.
    """
    for adapter, adapter_config in model.peft_config.items():
        for module in model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict) and adapter in dropouts and isinstance(dropouts[adapter], torch.nn.Dropout):
                dropouts[adapter].p = adapter_config.lora_dropout
