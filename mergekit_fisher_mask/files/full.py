"""The full-Fisher folder: one float32 Fisher tensor per parameter, under the model's own names, sharded like the model.

``fisher.safetensors.index.json`` maps each tensor to its shard and carries the metadata (:mod:`.base`'s, format
``mergekit-fisher-mask/full``, version 2, plus ``l2_norm``). Version-1 folders (written by 0.2.0, without the node
layout) are still read; their layout is not checked, only their ``model_type`` and fingerprint. The folder is
written under a hidden name and renamed into place when complete; tensors are read one at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, Iterator, Optional, Union

import torch
from safetensors import safe_open

from ..errors import FisherFileError
from ..outputs import OutputClaim, OutputKind, check_replaceable, publish, save_tensors, staged_folder, write_json
from .base import SHAPE_KEYS, Measured

FULL_FORMAT = "mergekit-fisher-mask/full"
INDEX_NAME = "fisher.safetensors.index.json"
_LAYOUTLESS_VERSION = "1"  # 0.2.0's folders: no node layout in the metadata


def _read_index(folder: Path) -> Optional[dict]:
    try:
        index = json.loads((Path(folder) / INDEX_NAME).read_text())
        return index if index["metadata"]["format"] == FULL_FORMAT and isinstance(index["weight_map"], dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _listed(folder: Path) -> Optional[set]:
    index = _read_index(folder)
    return None if index is None else {INDEX_NAME, *index["weight_map"].values()}


def is_full_fisher_dir(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a full-Fisher folder of this tool holding nothing but its index and the shards it lists."""
    return FullFisher.OUTPUT.is_ours(Path(path))


class FullFisherReader(Mapping):
    """The tensors of a full-Fisher folder, read one at a time on access (a whole folder is never loaded)."""

    def __init__(self, path: Union[str, os.PathLike]):
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

    def __contains__(self, name) -> bool:
        return name in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(name)
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

    def get(self, name: str, default=None) -> torch.Tensor:  # type: ignore[override]
        return self[name] if name in self.weight_map else default


@dataclass(frozen=True)
class FullFisher(Measured):
    """The diagonal Fisher of every parameter: ``tensors`` in memory after a calibration, or a
    :class:`FullFisherReader` after :meth:`read`. ``shard_of`` maps each tensor to the model shard it lives in."""

    FORMAT: ClassVar[str] = FULL_FORMAT
    FORMAT_VERSION: ClassVar[int] = 2
    DESCRIPTION: ClassVar[str] = "a full-Fisher folder"
    OUTPUT: ClassVar[OutputKind] = OutputKind("a full Fisher", folder=True, listed=_listed)

    tensors: Mapping = field(default_factory=dict)
    shard_of: Dict[str, str] = field(default_factory=dict)
    model_type: str = ""  # of a version-1 folder, which has no layout (``shape``) to say it

    @property
    def l2_norm(self) -> float:
        if isinstance(self.tensors, FullFisherReader):
            return self.tensors.l2_norm
        return float(torch.sqrt(sum((t.double() ** 2).sum() for t in self.tensors.values())))

    def metadata(self) -> Dict[str, str]:
        return {**super().metadata(), "l2_norm": repr(self.l2_norm)}

    def save(self, path: Union[str, os.PathLike], claim: Optional[OutputClaim] = None) -> Path:
        """Write the tensors sharded like the model, plus the index with the metadata, as one atomic folder.

        As for :meth:`MaskFisher.save`: without a claim only a full-Fisher folder of this tool is replaced."""
        claim = claim or check_replaceable(path, self.OUTPUT, overwrite=True)
        meta = self.metadata()
        shards = sorted(set(self.shard_of.values())) or ["model"]
        rename = {shard: f"fisher-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, shard in enumerate(shards)}
        groups: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in rename.values()}
        for name, tensor in self.tensors.items():
            groups[rename[self.shard_of.get(name, shards[-1])]][name] = tensor
        weight_map = {}
        with staged_folder(path) as staging:
            for file, tensors in groups.items():
                if tensors:
                    save_tensors(tensors, staging / file, {"format": FULL_FORMAT})
                    weight_map.update({name: file for name in tensors})
            write_json(staging / INDEX_NAME, {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})
            publish(staging, path, claim)
        return Path(path)

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> "FullFisher":
        """Open a full-Fisher folder: its metadata is validated now, each tensor when it is read."""
        reader = FullFisherReader(path)
        meta, where = reader.metadata, f"{reader.folder / INDEX_NAME}"
        if meta.get("format") == FULL_FORMAT and meta.get("format_version") == _LAYOUTLESS_VERSION:
            layoutless = {**meta, "format_version": str(cls.FORMAT_VERSION), "model_type": "", **dict.fromkeys(SHAPE_KEYS, "0")}
            provenance = {**cls.provenance_from(layoutless, where), "shape": None}
            return cls(**provenance, tensors=reader, model_type=meta.get("model_type", ""))
        provenance = cls.provenance_from(meta, where)
        return cls(**provenance, tensors=reader, model_type=provenance["shape"].model_type)

    def check_layout(self, config, *, where: str) -> None:
        if self.shape is not None:
            super().check_layout(config, where=where)
        elif self.model_type != config.model_type:  # a version-1 folder: tensor shapes are checked as they merge
            raise FisherFileError(
                f"{where} was measured on a {self.model_type!r} model; this model is {config.model_type!r}."
            )

    def tensor(self, name: str, like: torch.Tensor, *, where: str) -> torch.Tensor:
        """The Fisher of parameter ``name`` as float32, checked to have the shape of the model's tensor ``like``."""
        if name not in self.tensors:
            raise FisherFileError(f"Full Fisher {where} has no tensor {name}; was it measured on this model?")
        values = self.tensors[name].to(torch.float32)
        if tuple(values.shape) != tuple(like.shape):
            raise FisherFileError(
                f"Full Fisher {where}: {name} has shape {tuple(values.shape)}, the model's tensor {tuple(like.shape)}."
            )
        return values

    def summary(self) -> str:
        return f"L2 norm {self.l2_norm:.3e}"
