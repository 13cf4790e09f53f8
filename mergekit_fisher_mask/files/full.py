"""The full-Fisher folder: one float32 Fisher tensor per parameter, under the model's own names, sharded like the model.

``fisher.safetensors.index.json`` maps each tensor to its shard and carries the metadata (as the mask-Fisher file
does, plus ``l2_norm``). The folder is written under a hidden name and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoints import shard_map
from ..errors import FisherFileError
from ..outputs import OutputClaim, check_replaceable, publish, staged_folder

FULL_FORMAT = "mergekit-fisher-mask/full"
FULL_FORMAT_VERSION = 1
INDEX_NAME = "fisher.safetensors.index.json"


def save_full_fisher(
    fisher: Dict[str, torch.Tensor], model_dir: Path, out_dir: Union[str, Path], metadata: Dict[str, str],
    claim: Optional[OutputClaim] = None,
) -> Path:
    """Write Fisher tensors under the model's own names, sharded like the model, plus an index with metadata.

    The caller decides whether ``out_dir`` may be replaced (:func:`mergekit_fisher_mask.outputs.check_replaceable`);
    its ``claim`` is checked again right before the folder is moved into place. Without a claim, only a full-Fisher
    folder of this tool is replaced, and anything else at ``out_dir`` is refused.
    """
    claim = claim or check_replaceable(out_dir, overwrite=True, is_ours=is_full_fisher_dir, what="a full Fisher",
                                       folder=True)
    shard_of = shard_map(Path(model_dir))  # tensor name -> the model's weight file that holds it
    shards = sorted(set(shard_of.values())) or ["model"]
    rename = {shard: f"fisher-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, shard in enumerate(shards)}
    groups: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in rename.values()}
    for name, tensor in fisher.items():
        groups[rename[shard_of.get(name, shards[-1])]][name] = tensor.contiguous()
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in fisher.values()))
    meta = {**metadata, "format": FULL_FORMAT, "format_version": str(FULL_FORMAT_VERSION), "l2_norm": repr(float(norm))}
    weight_map = {}
    with staged_folder(out_dir) as staging:
        for file, tensors in groups.items():
            if tensors:
                save_file(tensors, str(staging / file), metadata={"format": FULL_FORMAT})
                weight_map.update({name: file for name in tensors})
        index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2))
        publish(staging, out_dir, claim)
    return Path(out_dir)


def is_full_fisher_dir(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a full-Fisher folder written by this tool: its index names our format, and the folder holds
    nothing but the index and the shards it lists (a file the user added makes it theirs too)."""
    index = Path(path) / INDEX_NAME
    try:
        content = json.loads(index.read_text())
        written = {INDEX_NAME, *content["weight_map"].values()}
        return content["metadata"]["format"] == FULL_FORMAT and {p.name for p in Path(path).iterdir()} <= written
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class FullFisherReader:
    """Reads one tensor at a time from a full-Fisher folder; never loads the whole file."""

    def __init__(self, path: str):
        folder = Path(path)
        index_path = folder / INDEX_NAME if folder.is_dir() else folder
        if not index_path.is_file():
            raise FisherFileError(
                f"{path}: no {INDEX_NAME} found. A full Fisher is a folder written by `mergekit-fisher calibrate --full`."
            )
        try:
            index = json.loads(index_path.read_text())
            self.metadata: Dict[str, str] = index["metadata"]
            self.weight_map: Dict[str, str] = index["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise FisherFileError(f"{index_path} is not a valid full-Fisher index ({error!r}).") from error
        if self.metadata.get("format") != FULL_FORMAT:
            raise FisherFileError(f"{index_path} is not a full-Fisher index (format {self.metadata.get('format')!r}).")
        if str(self.metadata.get("format_version")) != str(FULL_FORMAT_VERSION):
            raise FisherFileError(
                f"{index_path} has format_version {self.metadata.get('format_version')}; this version reads "
                f"{FULL_FORMAT_VERSION}. Re-run `mergekit-fisher calibrate --full`."
            )
        self.folder = index_path.parent
        try:
            self.l2_norm = float(self.metadata["l2_norm"])
        except (KeyError, TypeError, ValueError) as error:
            raise FisherFileError(f"{index_path}: metadata l2_norm is missing or not a number ({error!r}).") from error
        if not math.isfinite(self.l2_norm) or self.l2_norm <= 0:
            raise FisherFileError(
                f"{index_path}: metadata l2_norm is {self.l2_norm}; a Fisher with data in it has a finite, positive "
                "norm. Re-run `mergekit-fisher calibrate --full`."
            )

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        file = self.folder / self.weight_map[name]
        try:
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(name)
        except Exception as error:  # missing or corrupt shard: safetensors raises several types
            raise FisherFileError(f"{file}: cannot read Fisher tensor {name} ({error}).") from error
        if not torch.isfinite(tensor).all():
            raise FisherFileError(f"{file}: Fisher tensor {name} contains NaN or inf.")
        if (tensor < 0).any():
            raise FisherFileError(f"{file}: Fisher tensor {name} has negative values; a Fisher is a sum of squares.")
        return tensor
