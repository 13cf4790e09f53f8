"""The full-Fisher folder: one float32 Fisher tensor per parameter, under the model's own names, sharded like the model.

``fisher.safetensors.index.json`` maps each tensor to its shard and carries the metadata (:mod:`.base`'s, format
``mergekit-fisher-mask/full``, version 2, plus ``l2_norm``). Version-1 folders (written by 0.2.0, without the node
layout) are still read; their layout is not checked, only their ``model_type`` and fingerprint. The folder is
written under a hidden name and renamed into place when complete; tensors are read one at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, Optional, Union

import torch

from ..errors import FisherFileError
from ..outputs import OutputClaim, OutputKind, check_replaceable
from .base import SHAPE_KEYS, Measured, ShardedTensors, listed_by_index, save_sharded

FULL_FORMAT = "mergekit-fisher-mask/full"
INDEX_NAME = "fisher.safetensors.index.json"
_LAYOUTLESS_VERSION = "1"  # 0.2.0's folders: no node layout in the metadata


def is_full_fisher_dir(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a full-Fisher folder of this tool holding nothing but its index and the shards it lists."""
    return FullFisher.OUTPUT.is_ours(Path(path))


def _check_fisher(name: str, tensor: torch.Tensor, file: Path) -> None:
    if not torch.isfinite(tensor).all():
        raise FisherFileError(f"{file}: Fisher tensor {name} contains NaN or inf.")
    if (tensor < 0).any():
        raise FisherFileError(f"{file}: Fisher tensor {name} has negative values; a Fisher is a sum of squares.")


class FullFisherReader(ShardedTensors):
    """The tensors of a full-Fisher folder, read one at a time on access, and its validated ``l2_norm``."""

    def __init__(self, path: Union[str, os.PathLike]):
        super().__init__(path, INDEX_NAME, "a full Fisher (`mergekit-fisher calibrate --full`)", _check_fisher)
        try:
            self.l2_norm = float(self.metadata["l2_norm"])
        except (KeyError, TypeError, ValueError) as error:
            raise FisherFileError(f"{self.index_path}: metadata l2_norm is missing or not a number ({error!r}).") from error
        if not math.isfinite(self.l2_norm) or self.l2_norm <= 0:
            raise FisherFileError(
                f"{self.index_path}: metadata l2_norm is {self.l2_norm}; a Fisher with data in it has a finite, positive "
                "norm. Re-run `mergekit-fisher calibrate --full`."
            )

    def get(self, name: str, default=None) -> torch.Tensor:  # type: ignore[override]
        return self[name] if name in self.weight_map else default


@dataclass(frozen=True)
class FullFisher(Measured):
    """The diagonal Fisher of every parameter: ``tensors`` in memory after a calibration, or a
    :class:`FullFisherReader` after :meth:`read`. ``shard_of`` maps each tensor to the model shard it lives in."""

    FORMAT: ClassVar[str] = FULL_FORMAT
    FORMAT_VERSION: ClassVar[int] = 2
    DESCRIPTION: ClassVar[str] = "a full-Fisher folder"
    OUTPUT: ClassVar[OutputKind] = OutputKind(
        "a full Fisher", folder=True, listed=lambda path: listed_by_index(path, INDEX_NAME, FULL_FORMAT)
    )

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
        shards = sorted(set(self.shard_of.values())) or ["model"]
        rename = {shard: f"fisher-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, shard in enumerate(shards)}
        groups: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in rename.values()}
        for name, tensor in self.tensors.items():
            groups[rename[self.shard_of.get(name, shards[-1])]][name] = tensor
        return save_sharded(path, groups, INDEX_NAME, self.metadata(), claim, shard_format=FULL_FORMAT)

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> "FullFisher":
        """Open a full-Fisher folder: its metadata is validated now, each tensor when it is read."""
        reader = FullFisherReader(path)
        meta, where = reader.metadata, str(reader.index_path)
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
