"""Where the base model is, and what it looks like, read from config.json and safetensors headers only.

A base model is a local directory or a hub id. A hub id is looked up in the local Hugging Face
cache first (so HF_HUB_OFFLINE=1 works); it is downloaded only when online, from HF_ENDPOINT
when that is set. No weights are loaded here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import i18n
from ..errors import BaseModelError
from ..tensor_io import SafetensorsFormatError, TensorInfo, read_header

__all__ = [
    "BaseModelInfo",
    "resolve_base_model",
    "inspect_base_model",
    "hub_cache_dir",
    "is_offline",
    "local_base_dirs",
    "is_hub_id",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def tokenizer_source(candidates: list[Path]) -> Path | None:
    """The first folder that holds a tokenizer: the order is the caller's (checkpoint, training root, base)."""
    return next((d for d in candidates if any((d / f).is_file() for f in TOKENIZER_FILES)), None)


@dataclass
class BaseModelInfo:
    name: str
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    shards: list[Path]
    files: dict[str, Path]  # the shard that holds each tensor

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in TOKENIZER_FILES)


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, checked at call time."""
    values = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(v.strip().upper() in ("1", "ON", "YES", "TRUE") for v in values)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from HF_HUB_CACHE, HF_HOME or the default, read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def is_hub_id(name: str) -> bool:
    """``org/name`` (or ``name``) as the hub spells repositories, and not a path (./x, ~/x, /x)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


def local_base_dirs(name: str) -> list[Path]:
    """Where base ``name`` already lies on this machine, found without downloading anything: the folder itself for a
    path, or for a hub id its folder in the hub cache (``models--org--name``: the snapshots whose files link into its
    blobs). The overlap rule keeps a run from writing into any of them."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return [path]
    if not is_hub_id(name):
        return []
    repo = hub_cache_dir() / ("models--" + name.replace("/", "--"))
    return [repo] if repo.is_dir() else []


def resolve_base_model(name: str) -> Path:
    """The local directory of base model ``name`` (a path or a hub id); for a bitsandbytes base, the plain base of its
    dequantized weights (checkpoint/quantized_base.py). Raises BaseModelError (ME301, ME303, ME305)."""
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not path.is_dir():
            raise BaseModelError("base_model_invalid", path=name, problem=i18n.ui("reason_not_a_dir"))
        return _plain(path)
    if not is_hub_id(name):
        fix = i18n.ui("fix_base_path", name=name, cwd=str(Path.cwd()))
        raise BaseModelError("base_model_not_found", name=name, reason=i18n.ui("reason_no_dir"), fix=fix)
    return _plain(_from_hub(name))


def _plain(path: Path) -> Path:
    """``path`` itself, or, for a bitsandbytes base, the plain base of its dequantized weights. Other quantized
    folders are left as they are (the layer-streamed runtime reads our compressed-tensors artifacts): a merge or a
    check refuses them as a base (refuse_quantized)."""
    from .quantized_base import plain_base, quantization_of, unsupported_quantization

    quantization = quantization_of(path)
    if quantization is None or unsupported_quantization(quantization) is not None:
        return path
    return plain_base(path, quantization)


def refuse_quantized(info: BaseModelInfo) -> BaseModelInfo:
    """``info`` of a base an adapter can be merged into; ME305 for a base whose quantization is not read here (GPTQ,
    AWQ, compressed-tensors, FP8): its weights are not the matrices an adapter adds to."""
    quantization = info.config.get("quantization_config")
    if isinstance(quantization, dict):
        method = str(quantization.get("quant_method") or "unknown")
        raise BaseModelError("base_model_quantized", path=str(info.path), method=method)
    return info


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any lookup failure means "not in the cache"
        cached_error = exc
    if is_offline():
        raise BaseModelError(
            "base_model_not_found",
            name=repo_id,
            reason=i18n.ui("reason_offline_not_cached", cache=cache),
            fix=i18n.ui("fix_base_offline", name=repo_id),
        ) from cached_error
    try:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=cache,
                allow_patterns=_DOWNLOAD_PATTERNS,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
        )
    except Exception as exc:  # noqa: BLE001 - network, auth and missing repos all end here
        raise BaseModelError(
            "base_model_not_found",
            name=repo_id,
            reason=i18n.ui("reason_download_failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0]),
            fix=i18n.ui("fix_base_download", name=repo_id),
        ) from exc


def inspect_base_model(name: str) -> BaseModelInfo:
    """Resolve ``name`` and read its config.json and safetensors headers (no weights).

    Raises BaseModelError: not found (ME301) or not a usable model directory (ME303).
    """
    path = resolve_base_model(name)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BaseModelError("base_model_invalid", path=str(path), problem=i18n.ui("reason_no_config"))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaseModelError("base_model_invalid", path=str(path), problem=f"config.json: {exc}") from None
    shards = _shards(path)
    tensors: dict[str, TensorInfo] = {}
    files: dict[str, Path] = {}
    for shard in shards:
        try:
            header = read_header(shard).tensors
        except (OSError, SafetensorsFormatError) as exc:
            raise BaseModelError("base_model_invalid", path=str(path), problem=f"{shard.name}: {exc}") from None
        tensors.update(header)
        files.update(dict.fromkeys(header, shard))
    if not isinstance(config, dict):
        raise BaseModelError("base_model_invalid", path=str(path), problem=i18n.ui("reason_config_not_mapping"))
    problem = _layers_problem(config, tensors)
    if problem:
        raise BaseModelError("base_model_invalid", path=str(path), problem=problem)
    return BaseModelInfo(name, path, config, tensors, shards, files)


def _layers_problem(config: dict[str, Any], tensors: dict[str, Any]) -> str | None:
    """config.json's layer count against the layers the weights hold (``...layers.N.``), and layer_types' length."""
    layers = {int(m.group(1)) for name in tensors if (m := re.search(r"\.layers\.(\d+)\.", name))}
    declared = config.get("num_hidden_layers")
    if isinstance(declared, int) and layers and declared != max(layers) + 1:
        return i18n.ui("reason_layer_count", declared=declared, found=max(layers) + 1)
    types = config.get("layer_types")
    if isinstance(declared, int) and isinstance(types, list) and len(types) != declared:
        return i18n.ui("reason_layer_types", declared=declared, types=len(types))
    return None


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise BaseModelError("base_model_invalid", path=str(path), problem=f"{index.name}: {exc}") from None
        shards = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise BaseModelError(
                "base_model_invalid",
                path=str(path),
                problem=i18n.ui("reason_missing_shards", shards=", ".join(missing)),
            )
        return shards
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise BaseModelError("base_model_invalid", path=str(path), problem=i18n.ui("reason_no_safetensors"))
    return shards
