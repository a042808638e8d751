"""The Hugging Face hub, checked before anything is loaded from it, so that no network costs seconds, not minutes.

Without network, huggingface_hub retries every request five times with backoff (about 25 s per file, with no
setting to change it), and the error that finally comes names neither the config key nor a way out. So commands
that would load hub models or datasets first probe the hub once with a short timeout. When it is unreachable (or
HF_HUB_OFFLINE is set), whatever the local cache holds is loaded from there, in offline mode; anything it lacks is
one error naming the key and the offline options.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .config import ConfigError, RecipeConfig, looks_like_local_path

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0
OFFLINE_OPTIONS = (
    "to work offline, set data.source to a local .jsonl file or `synthetic`, and model.name_or_path to a local model "
    "directory (see README, 'Your own data and model, offline')"
)
LOCAL_SOURCES = ("synthetic", "local-bpe")


def is_hub_name(name: str | None) -> bool:
    return bool(name) and name not in LOCAL_SOURCES and not looks_like_local_path(name)


def hub_names(config: RecipeConfig, models: bool = True, data: bool = True) -> list[tuple[str, str, str]]:
    """(config key, hub id, kind) of everything the config would load from the hub."""
    named = []
    if models:
        named += [(key, name, "model") for key, name in (("model.name_or_path", config.model.name_or_path), ("model.tokenizer", config.model.tokenizer))]
    if data:
        data_config = config.data
        sources = [("data.test_source", data_config.test_source), ("data.val_source", data_config.val_source)]
        if data_config.mixture is None:
            sources.insert(0, ("data.source", data_config.source))
        else:
            sources += [(f"data.mixture[{i}].source", entry.source) for i, entry in enumerate(data_config.mixture)]
        named += [(key, name, "dataset") for key, name in sources]
    # `data.source: foo.jsonl` that does not exist is a missing file, which data loading reports; not a hub id.
    return [(key, name, kind) for key, name, kind in named if is_hub_name(name) and not name.endswith((".jsonl", ".gz", ".json"))]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now, or None. Any HTTP answer counts as reachable (proxies in the environment apply)."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        return f"{endpoint} unreachable: {reason}"
    return None


def is_cached(name: str, kind: str) -> bool:
    """Whether a hub model or dataset has been downloaded before (the hub cache, or for datasets their own cache)."""
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / f"{kind}s--{name.replace('/', '--')}"
    if (repo_dir / "snapshots").is_dir():
        return True
    if kind == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
        return (datasets_cache / name.replace("/", "___")).is_dir()
    return False


def _go_offline() -> None:
    """Hub libraries read HF_HUB_OFFLINE when imported; those already imported get the value set on them too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module_name in ("huggingface_hub.constants", "datasets.config"):
        module = sys.modules.get(module_name)
        if module is not None:
            module.HF_HUB_OFFLINE = True


def check_hub_access(config: RecipeConfig, models: bool = True, data: bool = True) -> None:
    """Probe the hub once if the config needs it; offline, use the cache or raise naming the key that needs the hub."""
    named = hub_names(config, models, data)
    if not named:
        return
    reason = hub_unreachable_reason()
    if reason is None:
        return
    missing = [(key, name, kind) for key, name, kind in named if not is_cached(name, kind)]
    if missing:
        what = " and ".join(f"{key} {name!r} (a hub {kind})" for key, name, kind in missing)
        raise ConfigError(
            f"{config.origin(missing[0][0])}: {what} {'is' if len(missing) == 1 else 'are'} not in the local cache and the "
            f"hub is not available ({reason}); {OFFLINE_OPTIONS}"
        )
    already_offline = _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")
    _go_offline()
    if not already_offline:
        print(f"note: {reason}; loading {', '.join(name for _, name, _ in named)} from the local cache", flush=True)
