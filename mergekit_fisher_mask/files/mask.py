"""The mask-Fisher file: a small safetensors file with one float32 tensor per node group.

Single-stack models store ``head_fisher`` [L, H] and ``ffn_fisher`` [L, D]; mixtures of experts ``expert_fisher``
[L, E, I] (and ``ffn_fisher`` for a shared expert); encoder-decoder models ``encoder_head_fisher``,
``encoder_ffn_fisher``, ``decoder_head_fisher``, ``decoder_cross_head_fisher`` and ``decoder_ffn_fisher`` (see
:mod:`mergekit_fisher_mask.architectures`). Its string metadata is :mod:`.base`'s (format
``mergekit-fisher-mask/mask``, version 2); files are validated on load (format, version, tensors, shapes, finite,
non-negative).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from ..errors import FisherFileError
from ..outputs import OutputClaim, OutputKind, check_replaceable, save_tensors, staged_file
from .base import Measured, top_share

FORMAT = "mergekit-fisher-mask/mask"


def is_mask_fisher_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a mask-Fisher file written by this tool (read from its header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False


@dataclass(frozen=True)
class MaskFisher(Measured):
    """Per-node Fisher of one model plus the provenance needed to trust it; ``groups`` maps each node group's file
    key to its Fisher, in the architecture table's order."""

    FORMAT: ClassVar[str] = FORMAT
    FORMAT_VERSION: ClassVar[int] = 2
    DESCRIPTION: ClassVar[str] = "a mask-Fisher file"
    OUTPUT: ClassVar[OutputKind] = OutputKind(
        "a mask-Fisher file", folder=False, listed=lambda path: {""} if is_mask_fisher_file(path) else None
    )

    groups: Dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, path: Union[str, os.PathLike], claim: Optional[OutputClaim] = None) -> Path:
        """Validate and write atomically (a crash never leaves a half-written file under ``path``).

        The caller decides whether ``path`` may be replaced (:func:`mergekit_fisher_mask.outputs.claim_output`); its
        ``claim`` is checked again right before the file is moved into place. Without a claim, only a mask-Fisher
        file of this tool is replaced, and anything else at ``path`` is refused.
        """
        claim = claim or check_replaceable(path, self.OUTPUT, overwrite=True)
        self.check_tensors(self.groups, where=str(path))
        with staged_file(path, claim) as staging:
            save_tensors({key: value.float() for key, value in self.groups.items()}, staging, self.metadata())
        return Path(path)

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> "MaskFisher":
        """Read and validate a mask-Fisher file; raise :class:`FisherFileError` naming the file on any defect."""
        where = str(path)
        if os.path.isdir(where):
            raise FisherFileError(
                f"{where} is a folder; a mask-Fisher file is one .safetensors file (`mergekit-fisher calibrate`). "
                "Full-Fisher and Gram folders are read by the fisher and regmean methods."
            )
        if not os.path.isfile(where):
            raise FisherFileError(f"Fisher file {where} does not exist. Run `mergekit-fisher calibrate` to create it.")
        try:
            with safe_open(where, framework="pt") as handle:
                meta = handle.metadata() or {}
                provenance = cls.provenance_from(meta, where)
                groups = {key: handle.get_tensor(key).float() for key in handle.keys()}
        except SafetensorError as error:
            raise FisherFileError(f"{where} is not a readable safetensors file ({error}).") from error
        fisher = cls(**provenance)
        fisher.check_tensors(groups, where=where)
        return fisher.replace(groups={key: groups[key] for key in fisher.group_shapes(where)})  # the table's order

    def check_tensors(self, groups: Dict[str, torch.Tensor], *, where: str) -> None:
        expected = self.group_shapes(where)
        if set(groups) != set(expected):
            raise FisherFileError(
                f"{where} holds tensors {', '.join(sorted(groups))}; a {self.shape.model_type} model's file holds "
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

    def summary(self) -> str:
        return "top 10% of nodes hold " + ", ".join(
            f"{top_share(values):.1%} of {key.removesuffix('_fisher')}" for key, values in self.groups.items()
        )


def save_mask_fisher(fisher: MaskFisher, path: Union[str, os.PathLike], claim: Optional[OutputClaim] = None) -> Path:
    """:meth:`MaskFisher.save` (kept as a function for existing callers)."""
    return fisher.save(path, claim)


def load_mask_fisher(path: Union[str, os.PathLike]) -> MaskFisher:
    """:meth:`MaskFisher.read` (kept as a function for existing callers)."""
    return MaskFisher.read(path)


def check_matches_model(fisher: MaskFisher, config, fingerprint: Optional[str], *, where: str) -> None:
    """:meth:`MaskFisher.check_matches_model` (kept as a function for existing callers)."""
    fisher.check_matches_model(config, fingerprint, where=where)
