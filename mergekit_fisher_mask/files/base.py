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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional

from ..architectures import NodeShape
from ..errors import FisherFileError, UnsupportedArchitectureError

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
