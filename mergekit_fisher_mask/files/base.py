"""What every statistic file records about where it came from, read, written and checked in one place.

Each format (:mod:`.mask`, :mod:`.full`, :mod:`.gram`) is a record type derived from :class:`Measured` that adds its
tensors. The record owns its format: ``save(path, claim)``, ``read(path)`` (a classmethod), ``metadata()`` and
``check_matches_model(config, fingerprint, where=...)``; ``card_row()`` is what a model card says about it.

String metadata common to every format:

==================  ==========================================================
``format``          ``mergekit-fisher-mask/<kind>``
``format_version``  the format's version
``model_type``      HF ``model_type`` of the measured model
``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``intermediate_size``, ``hidden_size``,
``num_experts``, ``expert_size``, ``num_decoder_layers``: the measured model's node layout
``fingerprint``     :func:`mergekit_fisher_mask.checkpoints.model_fingerprint` of the measured weights
``model``           the model reference as given by the user
``samples``         number of calibration examples N
``estimator``       how it was estimated (``empirical``, ..., or ``forward`` for a forward-only statistic)
``loss``            the loss whose gradients were squared (empty for a forward-only statistic)
``dtype``           the dtype the weights were loaded in
``data``            JSON description of the calibration data and settings
==================  ==========================================================

Metadata is written in this fixed order and safetensors headers with sorted keys, so identical inputs give
byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, Optional

import torch
from safetensors import safe_open

from ..architectures import NodeShape
from ..errors import FisherFileError, UnsupportedArchitectureError
from ..outputs import publish, save_tensors, staged_folder, write_json

SHAPE_KEYS = (
    "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "hidden_size", "num_experts",
    "expert_size", "num_decoder_layers",
)


@dataclass(frozen=True)
class Measured:
    """Provenance shared by every statistic file: the model's layout and fingerprint, and how it was measured."""

    FORMAT: ClassVar[str] = ""
    FORMAT_VERSION: ClassVar[int] = 1
    DESCRIPTION: ClassVar[str] = "a statistic file"  # how messages name the format

    @classmethod
    def noun(cls) -> str:
        """The format's name without its article, e.g. ``mask-Fisher file``."""
        return cls.DESCRIPTION.removeprefix("a ")

    shape: Optional[NodeShape] = None
    fingerprint: str = ""
    model: str = ""
    samples: int = 0
    estimator: str = ""
    loss: str = ""
    dtype: str = "float32"
    data: Dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> Dict[str, str]:
        """The string metadata every format writes, in a fixed order (the format adds its own keys after these)."""
        if self.shape is None:
            raise FisherFileError(f"{self.DESCRIPTION} without a node layout (shape) cannot be written.")
        return {
            "format": self.FORMAT,
            "format_version": str(self.FORMAT_VERSION),
            "model_type": self.shape.model_type,
            **{key: str(getattr(self.shape, key)) for key in SHAPE_KEYS},
            "fingerprint": self.fingerprint,
            "model": self.model,
            "samples": str(self.samples),
            "estimator": self.estimator,
            "loss": self.loss,
            "dtype": self.dtype,
            "data": json.dumps(self.data, sort_keys=True),
        }

    @classmethod
    def provenance_from(cls, meta: Dict[str, str], where: str) -> Dict[str, Any]:
        """Keyword arguments of the common fields, read and validated from a file's metadata."""
        if meta.get("format") != cls.FORMAT:
            raise FisherFileError(
                f"{where} is not {cls.DESCRIPTION} (metadata format={meta.get('format')!r}, expected {cls.FORMAT!r})."
            )
        if meta.get("format_version") != str(cls.FORMAT_VERSION):
            raise FisherFileError(
                f"{where} has format_version {meta.get('format_version')}; this version of mergekit-fisher-mask reads "
                f"version {cls.FORMAT_VERSION}. Re-run the calibration."
            )
        try:
            shape = NodeShape(model_type=meta["model_type"], **{key: int(meta[key]) for key in SHAPE_KEYS})
            return {
                "shape": shape,
                "fingerprint": meta.get("fingerprint", ""),
                "model": meta.get("model", ""),
                "samples": int(meta["samples"]),
                "estimator": meta.get("estimator", ""),
                "loss": meta.get("loss", ""),
                "dtype": meta.get("dtype", "float32"),
                "data": json.loads(meta.get("data", "{}")),
            }
        except (KeyError, ValueError, TypeError) as error:
            raise FisherFileError(f"{where} has incomplete or malformed metadata ({error!r}).") from error

    def group_shapes(self, where: str) -> Dict[str, tuple]:
        """The node groups of the measured layout; an unsupported ``model_type`` is the file's defect here."""
        try:
            return self.shape.group_shapes()
        except UnsupportedArchitectureError as error:
            raise FisherFileError(f"{where}: {error}") from None

    def check_matches_model(self, config, fingerprint: Optional[str], *, where: str) -> None:
        """Refuse a file measured on another architecture or layout, or (with a fingerprint) on other weights."""
        self.check_layout(config, where=where)
        if fingerprint is not None and self.fingerprint != fingerprint:
            raise FisherFileError(
                f"{where} was measured on a different model (fingerprint {self.fingerprint}, this model has "
                f"{fingerprint}; measured on {self.model!r}). Re-calibrate, or pass --no-verify-fingerprint if the "
                "weights only changed dtype."
            )

    def check_layout(self, config, *, where: str) -> None:
        """Refuse a file measured on a model of another architecture or node layout than ``config``'s."""
        shape = NodeShape.from_config(config, where=where)
        if self.shape != shape:
            diffs = [
                f"{key}: file {getattr(self.shape, key)} vs model {getattr(shape, key)}"
                for key in ("model_type",) + SHAPE_KEYS
                if getattr(self.shape, key) != getattr(shape, key)
            ]
            raise FisherFileError(
                f"{where} was measured on a model of another architecture or shape ({'; '.join(diffs)})."
            )

    @classmethod
    def check_compatible(cls, records: Dict[str, "Measured"]) -> None:
        """Refuse files (``{where: record}``) that cannot be merged together although each fits its model."""

    def summary(self) -> str:
        """One line for a model card; each format says what matters about its numbers."""
        return ""

    def card_row(self, path: str) -> Dict[str, Any]:
        """What a model card and the merge marker record about this file."""
        return {
            "file": str(path),
            "format": self.FORMAT,
            "samples": self.samples,
            "estimator": self.estimator,
            "loss": self.loss,
            "data": self.data.get("source"),
            "summary": self.summary(),
        }

    def replace(self, **changes) -> "Measured":
        return dataclasses.replace(self, **changes)


def top_share(values, fraction: float = 0.1) -> float:
    """Share of the total held by the largest ``fraction`` of entries (at least one entry)."""
    flat = values.flatten().double()
    total = flat.sum()
    if total <= 0:
        return 0.0
    count = max(1, int(round(fraction * flat.numel())))
    return float(flat.topk(count).values.sum() / total)


class ShardedTensors(Mapping):
    """The tensors of a sharded statistic folder, read one at a time on access (a whole folder is never loaded).

    The folder holds ``index_name`` (JSON with ``metadata`` and ``weight_map``: tensor name -> shard file) and the
    shards. ``check(name, tensor, file)`` validates each tensor as it is read.
    """

    def __init__(self, path, index_name: str, description: str, check: Callable[[str, torch.Tensor, Path], None]):
        folder = Path(path)
        index_path = folder / index_name if folder.is_dir() else folder
        if folder.is_file() and folder.name != index_name:
            raise FisherFileError(f"{path} is a file; {description} is a folder (with {index_name} in it).")
        if not index_path.is_file():
            raise FisherFileError(f"{path}: no {index_name} found; {description} is a folder written by mergekit-fisher.")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            self.metadata: Dict[str, str] = index["metadata"]
            self.weight_map: Dict[str, str] = index["weight_map"]
            if not isinstance(self.metadata, dict) or not isinstance(self.weight_map, dict):
                raise TypeError("metadata and weight_map must be mappings")
            if not all(isinstance(shard, str) and shard for shard in self.weight_map.values()):
                raise TypeError("every weight_map value must be a shard's file name")
        except UnicodeDecodeError:
            raise FisherFileError(f"{index_path} is not a JSON index of {description} (it is binary).") from None
        except (ValueError, KeyError, TypeError) as error:
            raise FisherFileError(f"{index_path} is not a valid index of {description} ({error}).") from None
        self.folder, self.index_path, self._check = index_path.parent, index_path, check
        for shard in sorted(set(self.weight_map.values())):  # a missing or truncated shard fails now, not mid-merge
            file = self.folder / shard
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as error:  # safetensors raises SafetensorError, OSError or FileNotFoundError
                problem = "is missing" if not file.exists() else f"cannot be read ({error}); is it truncated?"
                raise FisherFileError(f"{file}, a shard listed by {index_path}, {problem}") from None

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
        except Exception as error:  # missing, truncated or corrupt shard: safetensors raises several types
            raise FisherFileError(f"{file}: cannot read tensor {name} ({error}). Is the file truncated?") from error
        self._check(name, tensor, file)
        return tensor


def listed_by_index(folder, index_name: str, format_name: str) -> Optional[set]:
    """The files a statistic folder's index vouches for (itself and its shards), or None if it is not ours."""
    try:
        index = json.loads((Path(folder) / index_name).read_text())
        if index["metadata"]["format"] != format_name or not isinstance(index["weight_map"], dict):
            return None
        return {index_name, *index["weight_map"].values()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_sharded(path, shards: Dict[str, Dict[str, torch.Tensor]], index_name: str, metadata: Dict[str, str],
                 claim, *, shard_format: str) -> Path:
    """Write ``{shard file: {name: tensor}}`` and an index with ``metadata`` as one atomic folder at ``path``."""
    weight_map = {}
    with staged_folder(path) as staging:
        for file, tensors in shards.items():
            if tensors:
                save_tensors(tensors, staging / file, {"format": shard_format})
                weight_map.update({name: file for name in tensors})
        write_json(staging / index_name, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})
        publish(staging, path, claim)
    return Path(path)
