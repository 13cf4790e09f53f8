"""The mask-Fisher file: a small safetensors file with ``head_fisher`` [L, H] and ``ffn_fisher`` [L, D].

Its string metadata carries everything a merge needs to use it, and to refuse it for the wrong model:

==================  ==========================================================
``format``          ``mergekit-fisher-mask/mask``
``format_version``  ``1``
``model_type``      HF ``model_type`` of the measured model
``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``intermediate_size``, ``hidden_size``
``fingerprint``     :func:`mergekit_fisher_mask.checkpoints.model_fingerprint` of the measured weights
``model``           the model reference as given by the user
``samples``         number of calibration examples N
``estimator``       ``empirical`` | ``expected`` | ``sampled`` | ``batch``
``loss``            ``cross_entropy`` | ``mse`` | ``causal_lm``
``dtype``           the dtype the weights were loaded in (``float32`` for files written before it was recorded)
``data``            JSON description of the calibration data and settings
==================  ==========================================================
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..architectures import NodeShape
from ..errors import FisherFileError
from ..outputs import staged_file

FORMAT = "mergekit-fisher-mask/mask"
FORMAT_VERSION = 1
_SHAPE_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "hidden_size")


@dataclass(frozen=True)
class MaskFisher:
    """Per-node Fisher of one model plus the provenance needed to trust it."""

    head: torch.Tensor  # (L, H) float32
    ffn: torch.Tensor  # (L, D) float32
    shape: NodeShape
    fingerprint: str
    samples: int
    estimator: str
    loss: str
    model: str = ""
    data: Dict = field(default_factory=dict)
    dtype: str = "float32"

    def metadata(self) -> Dict[str, str]:
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "model_type": self.shape.model_type,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "samples": str(self.samples),
            "estimator": self.estimator,
            "loss": self.loss,
            "dtype": self.dtype,
            "data": json.dumps(self.data, sort_keys=True),
        }
        meta.update({key: str(getattr(self.shape, key)) for key in _SHAPE_KEYS})
        return meta


def save_mask_fisher(fisher: MaskFisher, path: Union[str, os.PathLike]) -> Path:
    """Validate and write atomically (a crash never leaves a half-written file under ``path``).

    The caller decides whether ``path`` may be replaced (see :func:`mergekit_fisher_mask.outputs.check_replaceable`).
    """
    _check_tensors(fisher.head, fisher.ffn, fisher.shape, where=str(path))
    tensors = {"head_fisher": fisher.head.float().contiguous(), "ffn_fisher": fisher.ffn.float().contiguous()}
    with staged_file(path) as staging:
        save_file(tensors, str(staging), metadata=fisher.metadata())
    return Path(path)


def is_mask_fisher_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a mask-Fisher file written by this tool (read from its header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False


def load_mask_fisher(path: Union[str, os.PathLike]) -> MaskFisher:
    """Read and validate a mask-Fisher file; raise :class:`FisherFileError` naming the file on any defect."""
    where = str(path)
    if not os.path.isfile(where):
        raise FisherFileError(f"Fisher file {where} does not exist. Run `mergekit-fisher calibrate` to create it.")
    try:
        with safe_open(where, framework="pt") as handle:
            meta = handle.metadata() or {}
            keys = set(handle.keys())
            if meta.get("format") != FORMAT:
                raise FisherFileError(
                    f"{where} is not a mask-Fisher file (metadata format={meta.get('format')!r}, "
                    f"expected {FORMAT!r}). Create one with `mergekit-fisher calibrate`."
                )
            if keys != {"head_fisher", "ffn_fisher"}:
                raise FisherFileError(f"{where} holds tensors {sorted(keys)}; expected head_fisher and ffn_fisher.")
            head = handle.get_tensor("head_fisher")
            ffn = handle.get_tensor("ffn_fisher")
    except SafetensorError as error:
        raise FisherFileError(f"{where} is not a readable safetensors file ({error}).") from error
    if int(meta.get("format_version", -1)) != FORMAT_VERSION:
        raise FisherFileError(
            f"{where} has format_version {meta.get('format_version')}; this version of mergekit-fisher-mask "
            f"reads version {FORMAT_VERSION}. Re-run calibration."
        )
    try:
        shape = NodeShape(model_type=meta["model_type"], **{key: int(meta[key]) for key in _SHAPE_KEYS})
        samples = int(meta["samples"])
        data = json.loads(meta.get("data", "{}"))
    except (KeyError, ValueError) as error:
        raise FisherFileError(f"{where} has incomplete or malformed metadata ({error!r}).") from error
    _check_tensors(head, ffn, shape, where=where)
    return MaskFisher(
        head=head.float(),
        ffn=ffn.float(),
        shape=shape,
        fingerprint=meta.get("fingerprint", ""),
        samples=samples,
        estimator=meta.get("estimator", ""),
        loss=meta.get("loss", ""),
        model=meta.get("model", ""),
        data=data,
        dtype=meta.get("dtype", "float32"),
    )


def _check_tensors(head: torch.Tensor, ffn: torch.Tensor, shape: NodeShape, *, where: str) -> None:
    expected_head = (shape.num_layers, shape.num_heads)
    expected_ffn = (shape.num_layers, shape.intermediate_size)
    for name, tensor, expected in (("head_fisher", head, expected_head), ("ffn_fisher", ffn, expected_ffn)):
        if tuple(tensor.shape) != expected:
            raise FisherFileError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {expected}.")
        if not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            raise FisherFileError(
                f"{where}: {name} contains NaN or inf (first at index {bad}). "
                "The calibration diverged; re-run it, e.g. without mixed precision."
            )
        if (tensor < 0).any():
            raise FisherFileError(f"{where}: {name} has negative entries; a Fisher is non-negative.")


def check_matches_model(fisher: MaskFisher, shape: NodeShape, fingerprint: str | None, *, where: str) -> None:
    """Refuse a Fisher measured on another architecture, shape or (when a fingerprint is given) model."""
    if fisher.shape != shape:
        diffs = [
            f"{key}: file {getattr(fisher.shape, key)} vs model {getattr(shape, key)}"
            for key in ("model_type",) + _SHAPE_KEYS
            if getattr(fisher.shape, key) != getattr(shape, key)
        ]
        raise FisherFileError(f"{where} was measured on a model of another architecture or shape ({'; '.join(diffs)}).")
    if fingerprint is not None and fisher.fingerprint != fingerprint:
        raise FisherFileError(
            f"{where} was measured on a different model (fingerprint {fisher.fingerprint}, this model has "
            f"{fingerprint}; measured on {fisher.model!r}). Re-calibrate, or pass --no-verify-fingerprint if the "
            "weights only changed dtype."
        )
