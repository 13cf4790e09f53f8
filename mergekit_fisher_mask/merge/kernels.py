"""Merge methods ``fisher_mask`` (node Fisher expanded per tensor) and ``fisher`` (full diagonal Fisher).

Both compute ``sum_k l_k F_k theta_k / sum_k l_k F_k`` in place, as mergekit's ``linear`` does; with ``sparsify``,
``fisher_mask`` merges trimmed, sign-elected task vectors over the base model instead (:mod:`.sparsify`). An entry
whose Fisher is zero in every model gets the ``l``-weighted mean (the authors' rule); floors are relative to each
model's own Fisher, so multiplying every model's Fisher by one constant changes no merge.
"""

from __future__ import annotations

import enum
import functools
import os
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods import BasePolicy, InputContract, PerInput, TensorEntry, TensorGroup, merge_method
from pydantic import Field
from typing_extensions import Annotated

from ..architectures import ArchitectureSpec, get_architecture
from ..errors import FisherMaskError
from ..files import INDEX_NAME, FullFisher, MaskFisher
from .expand import NodeWeights, Normalize, Scheme, Weight, mean_fisher_weight, tensor_weight
from .sparsify import Sparsify, merge_task_vectors


class Uncovered(str, enum.Enum):
    """What tensors no mask node covers (norms, embeddings, biases after a sum, routers, ...) get."""

    AVERAGE = "average"  # the plain weight-averaged mean, as `linear`
    BASE = "base"  # the base model's tensor, unchanged
    MEAN_FISHER = "mean_fisher"  # weighted by the mean Fisher of the layer's block (the universal weight outside)


def file_stamp(path: str) -> Tuple[int, int]:
    """Cache key part that changes when a file is rewritten, so a re-calibrated file is never served stale."""
    stat = os.stat(path) if os.path.isfile(path) else None
    return (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)


@functools.lru_cache(maxsize=256)
def _cached_node_weights(
    path: str, stamp: Tuple[int, int], normalize: Normalize, power: float, epsilon: float
) -> Tuple[NodeWeights, str]:
    fisher = MaskFisher.read(path)
    return NodeWeights.from_fisher(fisher, normalize, power, epsilon), fisher.shape.model_type


def node_weights(
    path: str, normalize: Normalize, power: float = 1.0, epsilon: float = 0.0
) -> Tuple[NodeWeights, ArchitectureSpec]:
    """Load (once per file version and setting) a mask-Fisher file's node weights and its architecture."""
    nodes, model_type = _cached_node_weights(os.path.abspath(path), file_stamp(path), Normalize(normalize), float(power),
                                             float(epsilon))
    return nodes, get_architecture(model_type, where=path)


def members(group: TensorGroup, statistic, method: str, parameter: str = "fisher") -> List[TensorEntry]:
    """Inputs that take part: all models, except a base model given only for its config/head (no statistic file)."""
    taking_part = [entry for entry in group.entries if not (entry.is_base and statistic[entry.id] is None)]
    missing = [str(entry.id) for entry in taking_part if statistic[entry.id] is None]
    if missing:
        raise FisherMaskError(
            f"{method} needs a `{parameter}` file (or `calibration_data` with mergekit-fisher merge) for every model; "
            f"missing for: {', '.join(missing)}."
        )
    if len(taking_part) < 2:
        raise FisherMaskError(f"{method} merges two or more models; got {len(taking_part)} with a `{parameter}` file.")
    return taking_part


def positive_lambdas(entries: Sequence[TensorEntry], weight, method: str, name: str) -> List[float]:
    lambdas = [weight[entry.id] for entry in entries]
    if sum(lambdas) <= 0:
        raise FisherMaskError(f"{method}: the model weights sum to {sum(lambdas)} for {name}; at least one must be positive.")
    return lambdas


def equal_where_all_zero(weights: List[Weight], lambdas: Sequence[float]) -> List[Weight]:
    """Per-entry weights ``l_k F_k`` (broadcastable), with the ``l_k`` put back where every model's is zero."""
    total = sum(weights)
    if not isinstance(total, torch.Tensor):
        return list(lambdas) if total == 0 else weights
    zero = total == 0
    if not bool(zero.any()):
        return weights
    return [torch.where(zero, torch.as_tensor(lam, dtype=total.dtype), torch.as_tensor(w, dtype=total.dtype))
            for w, lam in zip(weights, lambdas)]


def base_copy(group: TensorGroup, option: str, name: str) -> torch.Tensor:
    """The base model's tensor, for an ``option`` (e.g. ``fisher_mask: uncovered=base``) that takes it as is."""
    if group.base is None:
        raise FisherMaskError(f"{option} needs a base_model (tensor {name}).")
    return group.base.tensor.clone()


def weighted_average(
    entries: List[TensorEntry], weights: Iterable[Weight], lambdas: Optional[Sequence[float]] = None
) -> torch.Tensor:
    """``sum_k w_k theta_k / sum_k w_k`` for scalar or broadcastable weights, in place like `linear`.

    ``weights`` may be a generator, so that full-size weights are produced (read) one model at a time. Where the
    weights sum to zero, the result is the ``lambdas``-weighted mean (computed only if such entries exist).
    """
    first = entries[0].tensor
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    result = torch.zeros_like(first, dtype=dtype)
    denominator: Weight = 0.0
    for entry, weight in zip(entries, weights):
        if isinstance(weight, torch.Tensor):
            weight = weight.to(device=first.device, dtype=dtype)  # Fisher lives on CPU; mergekit --cuda moves tensors
            result.addcmul_(entry.tensor, weight)
        else:
            result.add_(entry.tensor, alpha=weight)
        if isinstance(weight, torch.Tensor) and isinstance(denominator, torch.Tensor):
            denominator.add_(weight)  # in place: a full-Fisher denominator is as large as the tensor
        else:
            denominator = denominator + weight
        del weight
    if not isinstance(denominator, torch.Tensor):
        if denominator == 0 and lambdas is not None:
            return weighted_average(entries, lambdas)
        return result.div_(denominator).to(first.dtype)
    zero = denominator == 0
    result.div_(denominator.to(dtype).masked_fill_(zero, 1.0))
    if lambdas is not None and bool(zero.any()):
        plain = weighted_average(entries, lambdas).to(dtype)
        result = torch.where(zero.expand_as(result), plain, result)
    return result.to(first.dtype)


def fisher_mask_merge(
    group: TensorGroup,
    weight: PerInput[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = 1.0,
    fisher: PerInput[Optional[str]] = None,
    scheme: Scheme = Scheme.NODES,
    normalize: Normalize = Normalize.LAYER,
    uncovered: Uncovered = Uncovered.AVERAGE,
    epsilon: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0,
    power: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0,
    sparsify: Sparsify = Sparsify.NONE,
    density: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0,
    consensus: bool = True,
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0,
    magnitude_power: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0,
) -> torch.Tensor:
    """Merge one tensor: each model weighted by ``weight * F^power``, F its node Fisher along the node axis (floored
    at ``epsilon`` times its group's layer mean); with ``sparsify``, merge trimmed, sign-elected task vectors over
    the base model instead (``scale`` and ``magnitude_power`` act on those, see :mod:`.sparsify`)."""
    name = group.metadata.name or "<unnamed tensor>"
    entries = members(group, fisher, "fisher_mask")
    lambdas = positive_lambdas(entries, weight, "fisher_mask", name)
    if sparsify != Sparsify.NONE and group.base is None:
        raise FisherMaskError(f"fisher_mask: sparsify={sparsify.value} merges task vectors and needs a base_model.")
    if sparsify == Sparsify.NONE and (scale != 1.0 or magnitude_power > 0):
        raise FisherMaskError("fisher_mask: scale and magnitude_power act on task vectors; set sparsify (e.g. "
                              "magnitude with density 1.0 to keep every entry) and a base_model.")
    loaded = [node_weights(fisher[entry.id], normalize, power, epsilon) for entry in entries]
    spec = loaded[0][1]
    if any(other.name != spec.name for _, other in loaded):
        raise FisherMaskError(f"fisher_mask: Fisher files of different architectures for {name}.")
    stack, layer, rule = spec.locate(name)
    per_model = [
        tensor_weight(nodes, stack, rule, layer, entry.tensor, scheme, name=name) for (nodes, _), entry in zip(loaded, entries)
    ]
    if per_model[0] is None:
        if uncovered == Uncovered.BASE:
            return base_copy(group, "fisher_mask: uncovered=base", name)
        if uncovered == Uncovered.MEAN_FISHER:
            per_model = [mean_fisher_weight(nodes, stack, rule, layer, name=name) for nodes, _ in loaded]
    if per_model[0] is None:
        weights: List[Weight] = list(lambdas)
    else:
        weights = equal_where_all_zero([lam * f for lam, f in zip(lambdas, per_model)], lambdas)
    if sparsify == Sparsify.NONE:
        return weighted_average(entries, weights)
    return merge_task_vectors(
        group.base.tensor, [entry.tensor for entry in entries], weights, sparsify, density, consensus, name=name,
        scale=scale, magnitude_power=magnitude_power,
    )


@functools.lru_cache(maxsize=256)
def _cached_full(path: str, stamp: Tuple[int, int]) -> FullFisher:
    return FullFisher.read(path)


def full_fisher(path: str) -> FullFisher:
    """Open (once per file version) a full-Fisher folder; its tensors are read on demand."""
    index = os.path.join(path, INDEX_NAME) if os.path.isdir(path) else path
    return _cached_full(os.path.abspath(path), file_stamp(index))


def fisher_merge(
    group: TensorGroup,
    weight: PerInput[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = 1.0,
    fisher: PerInput[Optional[str]] = None,
    fisher_floor: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-7,
    # Off by default: on four real MiniLM tasks raw Fisher merged better (examples/README.md).
    normalize: bool = False,
) -> torch.Tensor:
    """Matena & Raffel: each model weighted per entry by ``weight * max(F, floor)``, F divided by its L2 norm first
    when ``normalize``. The floor is one value for every model, ``fisher_floor`` times the mean L2 norm of the merged
    models' (used) Fisher: entries below it in every model are averaged alike, and multiplying every model's Fisher
    by one constant changes no merge."""
    name = group.metadata.name or "<unnamed tensor>"
    entries = members(group, fisher, "fisher")
    lambdas = positive_lambdas(entries, weight, "fisher", name)
    records = [full_fisher(fisher[entry.id]) for entry in entries]
    divisors = [record.l2_norm if normalize else 1.0 for record in records]
    floor = fisher_floor * sum(record.l2_norm / d for record, d in zip(records, divisors)) / len(records)

    def weights():
        # One model's Fisher tensor is read at a time and released after use.
        for entry, record, divisor, lam in zip(entries, records, divisors, lambdas):
            values = record.tensor(name, entry.tensor, where=fisher[entry.id])
            yield values.div_(divisor).clamp_min_(floor).mul_(lam)

    return weighted_average(entries, weights(), lambdas)


FISHER_MASK = merge_method(
    fisher_mask_merge,
    name="fisher_mask",
    pretty_name="Fisher Mask Nodes",
    reference_url="https://arxiv.org/abs/2403.09891",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=2),
)

FISHER = merge_method(
    fisher_merge,
    name="fisher",
    pretty_name="Fisher-weighted averaging",
    reference_url="https://arxiv.org/abs/2111.09832",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=2),
)
