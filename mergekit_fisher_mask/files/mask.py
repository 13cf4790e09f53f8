"""The mask-Fisher file: a small safetensors file with one float32 tensor per node group.

Single-stack models store ``head_fisher`` [L, H] and ``ffn_fisher`` [L, D]; mixtures of experts ``expert_fisher``
[L, E, I] (and ``ffn_fisher`` for a shared expert); encoder-decoder models ``encoder_head_fisher``,
``encoder_ffn_fisher``, ``decoder_head_fisher``, ``decoder_cross_head_fisher`` and ``decoder_ffn_fisher`` (see
:mod:`mergekit_fisher_mask.architectures`). Its string metadata carries everything a merge needs to use it, and to
refuse it for the wrong model:

==================  ==========================================================
``format``          ``mergekit-fisher-mask/mask``
``format_version``  ``2`` (version 1, head and FFN groups only, is still read)
``model_type``      HF ``model_type`` of the measured model
``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``intermediate_size``, ``hidden_size``,
``num_experts``, ``expert_size``, ``num_decoder_layers`` (the last three are 0 where they do not apply)
``fingerprint``     :func:`mergekit_fisher_mask.checkpoints.model_fingerprint` of the measured weights
``model``           the model reference as given by the user
``samples``         number of calibration examples N
``estimator``       ``empirical`` | ``expected`` | ``sampled`` | ``batch``
``loss``            ``cross_entropy`` | ``mse`` | ``causal_lm`` | ``token_cross_entropy`` | ``span`` | ``seq2seq``
``dtype``           the dtype the weights were loaded in (``float32`` for files written before it was recorded)
``data``            JSON description of the calibration data and settings
==================  ==========================================================
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..architectures import NodeShape
from ..errors import FisherFileError, UnsupportedArchitectureError
from ..outputs import OutputClaim, check_replaceable, staged_file

FORMAT = "mergekit-fisher-mask/mask"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_SHAPE_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "hidden_size")
_NEW_SHAPE_KEYS = ("num_experts", "expert_size", "num_decoder_layers")  # version 2; 0 in version-1 files


@dataclass(frozen=True)
class MaskFisher:
    """Per-node Fisher of one model plus the provenance needed to trust it.

    ``groups`` maps each node group's file key to its Fisher; ``head`` and ``ffn`` may be given instead for the
    common single-stack case and are kept as aliases of ``head_fisher`` and ``ffn_fisher``.
    """

    head: Optional[torch.Tensor] = None  # (L, H) float32
    ffn: Optional[torch.Tensor] = None  # (L, D) float32
    shape: Optional[NodeShape] = None
    fingerprint: str = ""
    samples: int = 0
    estimator: str = ""
    loss: str = ""
    model: str = ""
    data: Dict = field(default_factory=dict)
    dtype: str = "float32"
    groups: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        groups = dict(self.groups)
        for key, value in (("head_fisher", self.head), ("ffn_fisher", self.ffn)):
            if value is not None:
                groups[key] = value
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "head", groups.get("head_fisher"))
        object.__setattr__(self, "ffn", groups.get("ffn_fisher"))

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
        meta.update({key: str(getattr(self.shape, key)) for key in _SHAPE_KEYS + _NEW_SHAPE_KEYS})
        return meta


def save_mask_fisher(fisher: MaskFisher, path: Union[str, os.PathLike], claim: Optional[OutputClaim] = None) -> Path:
    """Validate and write atomically (a crash never leaves a half-written file under ``path``).

    The caller decides whether ``path`` may be replaced (:func:`mergekit_fisher_mask.outputs.check_replaceable`); its
    ``claim`` is checked again right before the file is moved into place. Without a claim, only a mask-Fisher file
    of this tool is replaced, and anything else at ``path`` is refused.
    """
    claim = claim or check_replaceable(path, overwrite=True, is_ours=is_mask_fisher_file, what="a mask-Fisher file",
                                       folder=False)
    _check_tensors(fisher.groups, fisher.shape, where=str(path))
    tensors = {key: value.float().contiguous() for key, value in fisher.groups.items()}
    with staged_file(path, claim) as staging:
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
            if meta.get("format") != FORMAT:
                raise FisherFileError(
                    f"{where} is not a mask-Fisher file (metadata format={meta.get('format')!r}, "
                    f"expected {FORMAT!r}). Create one with `mergekit-fisher calibrate`."
                )
            groups = {key: handle.get_tensor(key).float() for key in handle.keys()}
    except SafetensorError as error:
        raise FisherFileError(f"{where} is not a readable safetensors file ({error}).") from error
    if meta.get("format_version") not in {str(v) for v in READABLE_VERSIONS}:
        raise FisherFileError(
            f"{where} has format_version {meta.get('format_version')}; this version of mergekit-fisher-mask "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}. Re-run calibration."
        )
    try:
        sizes = {key: int(meta[key]) for key in _SHAPE_KEYS}
        sizes.update({key: int(meta.get(key, 0)) for key in _NEW_SHAPE_KEYS})
        shape = NodeShape(model_type=meta["model_type"], **sizes)
        samples = int(meta["samples"])
        data = json.loads(meta.get("data", "{}"))
    except (KeyError, ValueError) as error:
        raise FisherFileError(f"{where} has incomplete or malformed metadata ({error!r}).") from error
    _check_tensors(groups, shape, where=where)
    return MaskFisher(
        groups={key: groups[key] for key in shape.group_shapes()},  # in the table's order, not the file's
        shape=shape,
        fingerprint=meta.get("fingerprint", ""),
        samples=samples,
        estimator=meta.get("estimator", ""),
        loss=meta.get("loss", ""),
        model=meta.get("model", ""),
        data=data,
        dtype=meta.get("dtype", "float32"),
    )


def _check_tensors(groups: Dict[str, torch.Tensor], shape: NodeShape, *, where: str) -> None:
    try:
        expected = shape.group_shapes()
    except UnsupportedArchitectureError as error:
        raise FisherFileError(f"{where}: {error}") from None
    if set(groups) != set(expected):
        raise FisherFileError(
            f"{where} holds tensors {', '.join(sorted(groups))}; a {shape.model_type} model's file holds "
            f"{', '.join(sorted(expected))}."
        )
    for name, tensor in groups.items():
        if tuple(tensor.shape) != expected[name]:
            raise FisherFileError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {expected[name]}.")
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
            for key in ("model_type",) + _SHAPE_KEYS + _NEW_SHAPE_KEYS
            if getattr(fisher.shape, key) != getattr(shape, key)
        ]
        raise FisherFileError(f"{where} was measured on a model of another architecture or shape ({'; '.join(diffs)}).")
    if fingerprint is not None and fisher.fingerprint != fingerprint:
        raise FisherFileError(
            f"{where} was measured on a different model (fingerprint {fisher.fingerprint}, this model has "
            f"{fingerprint}; measured on {fisher.model!r}). Re-calibrate, or pass --no-verify-fingerprint if the "
            "weights only changed dtype."
        )
