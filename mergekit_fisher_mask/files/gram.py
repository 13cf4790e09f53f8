"""The Gram folder of RegMean: the Gram matrix ``sum_t x_t x_t^T`` of every measured linear layer input, and the
number of real tokens it sums over.

``gram.safetensors.index.json`` carries :mod:`.base`'s metadata (format ``mergekit-fisher-mask/gram``, version 1,
``estimator`` ``forward``), ``gram_dtype``, and ``inputs``: a JSON mapping from each Gram's name (the measured
module, e.g. ``model.layers.0.self_attn.q_proj``) to ``{"tokens": N, "weights": [...], "input_axis": a}``, the
weights that read that input (q, k and v share one Gram) and their input axis. Shards
``gram-0000i-of-0000n.safetensors`` hold the sums, one tensor per Gram under its name. A merge divides by the
token count, so each model's Gram is the per-token mean ``G = (1/N) sum_t x_t x_t^T`` and a model's say does not
depend on how long its calibration texts were.

Sizes: a Gram is ``d_in^2`` numbers. For Llama-3.1-8B (hidden 4096, FFN 14336, 32 layers) the four inputs of a
layer hold 3 x 4096^2 + 14336^2 numbers, 1.03 GB per layer in float32 and 33 GB per model; the ``gram_inputs``
setting leaves out the FFN output projection's (14336^2 = 822 MB per layer) and ``gram_dtype`` stores bfloat16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, Optional, Tuple, Union

import torch

from ..errors import FisherFileError
from ..outputs import OutputClaim, OutputKind, check_replaceable
from .base import Measured, ShardedTensors, listed_by_index, save_sharded

GRAM_FORMAT = "mergekit-fisher-mask/gram"
GRAM_INDEX = "gram.safetensors.index.json"
SHARD_BYTES = 2 * 10**9


@dataclass(frozen=True)
class GramInput:
    """One measured input: how many real tokens its Gram sums over, and the weights (full names) that read it."""

    tokens: int
    weights: Tuple[str, ...]
    input_axis: int = 1

    def as_json(self) -> dict:
        return {"tokens": self.tokens, "weights": list(self.weights), "input_axis": self.input_axis}


def _check_gram(name: str, tensor: torch.Tensor, file: Path) -> None:
    if tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
        raise FisherFileError(f"{file}: Gram {name} has shape {tuple(tensor.shape)}; a Gram matrix is square.")
    if not torch.isfinite(tensor).all():
        raise FisherFileError(f"{file}: Gram {name} contains NaN or inf; re-run `mergekit-fisher calibrate --gram`.")
    if (torch.diagonal(tensor) < 0).any():
        raise FisherFileError(f"{file}: Gram {name} has a negative diagonal entry; a Gram matrix is a sum of squares.")


@dataclass(frozen=True)
class GramStats(Measured):
    """Per-input Gram sums of one model (``grams``: in memory after a calibration, read on demand after
    :meth:`read`) and, per input, its token count and the weights that read it."""

    FORMAT: ClassVar[str] = GRAM_FORMAT
    FORMAT_VERSION: ClassVar[int] = 1
    DESCRIPTION: ClassVar[str] = "a Gram folder"
    OUTPUT: ClassVar[OutputKind] = OutputKind(
        "a Gram folder", folder=True, listed=lambda path: listed_by_index(path, GRAM_INDEX, GRAM_FORMAT)
    )

    grams: Mapping = field(default_factory=dict)
    inputs: Dict[str, GramInput] = field(default_factory=dict)
    gram_dtype: str = "float32"

    def metadata(self) -> Dict[str, str]:
        inputs = {name: entry.as_json() for name, entry in self.inputs.items()}  # in layer order
        return {**super().metadata(), "gram_dtype": self.gram_dtype, "inputs": json.dumps(inputs)}

    def save(self, path: Union[str, os.PathLike], claim: Optional[OutputClaim] = None) -> Path:
        """Write the Gram sums in shards of about 2 GB, plus the index, as one atomic folder (as the other formats:
        without a claim only a Gram folder of this tool is replaced)."""
        claim = claim or check_replaceable(path, self.OUTPUT, overwrite=True)
        dtype = getattr(torch, self.gram_dtype)
        shards, size = [{}], 0
        for name in self.inputs:  # in layer order
            tensor = self.grams[name].to(dtype)
            if shards[-1] and size + tensor.numel() * tensor.element_size() > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += tensor.numel() * tensor.element_size()
        files = {f"gram-{i + 1:05d}-of-{len(shards):05d}.safetensors": tensors for i, tensors in enumerate(shards)}
        return save_sharded(path, files, GRAM_INDEX, self.metadata(), claim, shard_format=GRAM_FORMAT)

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> "GramStats":
        """Open a Gram folder: its metadata is validated now, each Gram when it is read."""
        reader = ShardedTensors(path, GRAM_INDEX, "a Gram folder (`mergekit-fisher calibrate --gram`)", _check_gram)
        where = str(reader.index_path)
        provenance = cls.provenance_from(reader.metadata, where)
        try:
            inputs = {name: GramInput(int(entry["tokens"]), tuple(entry["weights"]), int(entry["input_axis"]))
                      for name, entry in json.loads(reader.metadata["inputs"]).items()}
        except (KeyError, TypeError, ValueError) as error:
            raise FisherFileError(f"{where}: metadata `inputs` is missing or malformed ({error!r}).") from error
        missing = sorted(set(inputs) - set(reader.weight_map))
        if missing:
            raise FisherFileError(f"{where} lists Gram {missing[0]} but holds no such tensor; the folder is incomplete.")
        return cls(**provenance, grams=reader, inputs=inputs, gram_dtype=reader.metadata.get("gram_dtype", "float32"))

    @classmethod
    def check_compatible(cls, records: Dict[str, "GramStats"]) -> None:
        """Every model's folder must measure the same inputs (the same ``gram_inputs``): a weight is solved from
        every model's Gram, or from none."""
        (first, reference), *rest = records.items()
        for where, record in rest:
            if set(record.inputs) != set(reference.inputs):
                only = sorted(set(record.inputs) ^ set(reference.inputs))
                raise FisherFileError(
                    f"{where} and {first} measured different inputs (e.g. {only[0]}): they were calibrated with "
                    "different gram_inputs. Calibrate every model with the same gram_inputs."
                )

    def gram_for(self, weight: str) -> Optional[str]:
        """The Gram that the weight ``weight`` (full tensor name) reads, or None if it has none."""
        return self._by_weight().get(weight)

    def _by_weight(self) -> Dict[str, str]:
        cached = self.__dict__.get("_weights")
        if cached is None:
            cached = {w: name for name, entry in self.inputs.items() for w in entry.weights}
            object.__setattr__(self, "_weights", cached)
        return cached

    def mean(self, name: str, *, where: str) -> torch.Tensor:
        """The per-token mean Gram ``(1/N) sum_t x_t x_t^T`` of input ``name``, as float32."""
        tokens = self.inputs[name].tokens
        if tokens <= 0:
            raise FisherFileError(f"{where}: Gram {name} was measured on no token; re-run the calibration with data.")
        return self.grams[name].to(torch.float32) / tokens

    def summary(self) -> str:
        tokens = max((entry.tokens for entry in self.inputs.values()), default=0)
        return f"{len(self.inputs)} Gram matrices over {tokens} tokens"
