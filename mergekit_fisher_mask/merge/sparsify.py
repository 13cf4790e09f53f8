"""Fisher-guided task vectors: trim each model's change from the base, elect signs, take the weighted mean.

With a base model ``theta_0``, each model's task vector ``tau_k = theta_k - theta_0`` is

1. **trimmed** to a fraction ``density`` of its entries: the largest by magnitude (TIES), by magnitude times the
   model's merge weight ``|tau_k| * w_k`` (``fisher``), or a random subset rescaled by ``1 / density`` (DARE);
2. **sign-elected** (``consensus``): an entry of ``tau_k`` is kept only if its sign agrees with that of the
   weighted mass ``sum_k w_k tau_k`` (TIES' election, with Fisher weights in place of magnitudes alone);
3. **merged** as the weighted mean of the kept entries, ``sum_k w_k m_k tau_k / sum_k w_k m_k`` (0 where no model
   keeps the entry), multiplied by ``scale`` (1: the mean; K: about the sum of K task vectors, as task arithmetic
   with lambda 1), and added back to the base.

``magnitude_power`` p > 0 multiplies each entry's weight by ``|tau_k|^p``: a soft version of the magnitude trim, in
which larger changes count more rather than smaller ones being dropped.

The semantics follow mergekit's ``ties`` and ``dare_ties`` / ``dare_linear`` (trim per tensor, elect by sign, divide
by the kept weights), with the weights ``w_k = lambda_k * F_k`` of ``fisher_mask``.
"""

from __future__ import annotations

import enum
import hashlib
from typing import List, Sequence

import torch

from .expand import Weight


class Sparsify(str, enum.Enum):
    NONE = "none"  # no task vectors: the weighted mean of the models themselves
    MAGNITUDE = "magnitude"  # TIES: keep the largest |tau_k|
    FISHER = "fisher"  # keep the largest |tau_k| * w_k: what the model both changed and relies on
    DARE = "dare"  # keep a random subset, rescaled by 1 / density


def trim_mask(delta: torch.Tensor, weight: Weight, method: Sparsify, density: float, *, seed: int) -> torch.Tensor:
    """Which entries of one task vector survive trimming (a bool tensor shaped like ``delta``)."""
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    if method == Sparsify.DARE:
        generator = torch.Generator(device=delta.device).manual_seed(seed)
        return torch.rand(delta.shape, generator=generator, device=delta.device) < density
    score = delta.abs() if method == Sparsify.MAGNITUDE else delta.abs() * weight  # broadcast to delta's shape
    keep = max(1, int(round(density * delta.numel())))
    if keep >= delta.numel():
        return torch.ones_like(delta, dtype=torch.bool)
    threshold = score.flatten().kthvalue(delta.numel() - keep + 1).values  # the keep-th largest score
    return score >= threshold


def merge_task_vectors(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[Weight],
    method: Sparsify,
    density: float,
    consensus: bool,
    *,
    name: str,
    scale: float = 1.0,
    magnitude_power: float = 0.0,
) -> torch.Tensor:
    """``base + scale * sum_k w_k m_k tau_k / sum_k w_k m_k`` with the trim and sign masks ``m_k`` described above;
    with ``magnitude_power`` p > 0 each entry's weight is also multiplied by ``|tau_k|^p`` (a soft trim)."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")  # reproducible DARE per tensor
    deltas: List[torch.Tensor] = []
    for index, (tensor, weight) in enumerate(zip(tensors, weights)):
        delta = tensor.to(dtype) - base.to(dtype)
        delta.mul_(trim_mask(delta, weight, method, density, seed=seed + index))
        if method == Sparsify.DARE:
            delta.div_(density)
        deltas.append(delta)
    full = [w.to(device=base.device, dtype=dtype) if isinstance(w, torch.Tensor) else float(w) for w in weights]
    if magnitude_power > 0:  # full-size weights: w_k |tau_k|^p, one model at a time
        full = [delta.abs().pow_(magnitude_power).mul_(w) for w, delta in zip(full, deltas)]
    if consensus:
        mass = torch.zeros_like(deltas[0])
        for w, d in zip(full, deltas):
            if isinstance(w, torch.Tensor):
                mass.addcmul_(d, w)
            else:
                mass.add_(d, alpha=w)
        elected = torch.sign(mass)
        del mass
        masks = [(torch.sign(d) == elected) & (d != 0) for d in deltas]
    else:
        masks = [d != 0 for d in deltas]
    numerator = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0])
    for weight, delta, mask in zip(full, deltas, masks):
        kept = mask.to(dtype).mul_(weight)  # (broadcast) weight where kept, 0 elsewhere
        numerator.addcmul_(delta, kept)
        denominator.add_(kept)
    # Where no model keeps an entry, the numerator is exactly 0 too, so 0 / tiny = 0 there.
    merged = numerator.div_(denominator.clamp_min_(torch.finfo(dtype).tiny))
    if scale != 1.0:
        merged.mul_(scale)
    return merged.add_(base.to(dtype)).to(base.dtype)
