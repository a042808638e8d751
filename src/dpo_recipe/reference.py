"""Reference-model log-probabilities, computed once and cached on disk.

The reference never changes during DPO, so its log-probs are a pure function of the reference model (architecture,
attention implementation, weights: `models.model_fingerprint`), the token ids, the layout, the precision and the code
that lays out and scores a batch: the recipe's own (`packing`) and what it runs on (torch's kernels, transformers'
model code, TRL's chunked log-prob kernel). Keyed by exactly that, one cache serves every epoch, every run of a sweep
and every evaluation, and nothing else: no upgrade reuses log-probs computed by other code.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
import trl
from datasets import Dataset
from safetensors.torch import load_file, save_file

from . import packing

CACHE_FORMAT = "v2"


def code_digest(*files: str | os.PathLike) -> str:
    """A hash of source files (those that exist), for cache keys: other code must not reuse what this code made."""
    digest = hashlib.sha256()
    for file in map(Path, files):
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


# The code that turns token ids into log-probs: a change to it must not reuse log-probs the old code computed.
SCORING_CODE = code_digest(packing.__file__)


def scoring_software() -> str:
    """The versions of the libraries the scoring code runs on, read at each use (an upgrade can happen between runs)."""
    return f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"


def dataset_fingerprint(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for ids in dataset[column]:
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike, model_key: str, dataset: Dataset, precision: str, layout: str) -> Path:
    parts = (CACHE_FORMAT, SCORING_CODE, scoring_software(), model_key, layout, dataset_fingerprint(dataset), precision)
    key = hashlib.sha256("|".join(parts).encode())
    return Path(cache_dir) / f"{key.hexdigest()[:24]}.safetensors"


def cached_reference_logps(
    path: Path, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Load (chosen, rejected) log-probs from `path`, or compute and store them. The flag says it was a hit."""
    if path.is_file():
        tensors = load_file(path)
        return tensors["chosen"], tensors["rejected"], True
    chosen, rejected = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a reader never sees half a file.
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, temporary)
    os.replace(temporary, path)
    return chosen, rejected, False


def with_reference_columns(dataset: Dataset, chosen: torch.Tensor, rejected: torch.Tensor) -> Dataset:
    columns = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in dataset.column_names]
    dataset = dataset.remove_columns(columns)
    dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
    return dataset.add_column("ref_rejected_logps", rejected.tolist())
