"""Model fingerprints and local resolution of model references (local folders or Hub ids)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List

from safetensors import safe_open

# The fingerprint hashes every tensor's name, dtype and shape plus a few values from its first and last rows.
# That reads kilobytes, not the checkpoint, yet it tells apart two fine-tunes of one base model.
_SAMPLE_VALUES = 16
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def resolve_model_dir(name_or_path: str) -> Path:
    """Return a local folder for a model: the path itself, or the Hub snapshot (downloaded if needed)."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as error:  # the Hub client raises many types; all mean "not reachable or not found"
        raise FileNotFoundError(
            f"Model {name_or_path!r} is neither a local folder nor a downloadable Hugging Face Hub repo "
            f"({type(error).__name__}: {error}). Pass a folder that holds config.json and *.safetensors, "
            "or a Hub id while online."
        ) from error


def weight_files(model_dir: Path) -> List[Path]:
    """The safetensors shards of a model folder, as its index lists them (other .safetensors files are ignored)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def model_fingerprint(model_dir: Path) -> str:
    """A short content hash of a model folder's weights; falls back to config.json when no safetensors exist."""
    digest = hashlib.sha256()
    files = weight_files(Path(model_dir))
    if not files:
        digest.update((Path(model_dir) / "config.json").read_bytes())
        return "config:" + digest.hexdigest()[:24]
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in sorted(handle.keys()):
                tensor_slice = handle.get_slice(name)
                shape = tensor_slice.get_shape()
                digest.update(f"{name}|{tensor_slice.get_dtype()}|{shape}".encode())
                if not shape or shape[0] == 0:
                    continue
                first = tensor_slice[0:1].flatten()[:_SAMPLE_VALUES]
                last = tensor_slice[shape[0] - 1 : shape[0]].flatten()[-_SAMPLE_VALUES:]
                for values in (first, last):
                    digest.update(values.float().numpy().tobytes())
    return "st:" + digest.hexdigest()[:24]
