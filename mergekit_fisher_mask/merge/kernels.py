"""Merge methods ``fisher_mask`` (node Fisher expanded per tensor) and ``fisher`` (full diagonal Fisher).

Both compute ``sum_k l_k F_k theta_k / sum_k l_k F_k`` in place, as mergekit's ``linear`` does; with ``sparsify``,
``fisher_mask`` merges trimmed, sign-elected task vectors over the base model instead (:mod:`.sparsify`).
"""

from __future__ import annotations

import enum
import functools
import os
from typing import Iterable, List, Optional, Tuple

import torch
from mergekit import merge_methods
from mergekit.merge_methods import BasePolicy, InputContract, PerInput, TensorEntry, TensorGroup, merge_method
from pydantic import Field
from typing_extensions import Annotated

from ..architectures import ArchitectureSpec, get_architecture
from ..errors import FisherFileError, FisherMaskError
from ..files import INDEX_NAME, FullFisherReader, load_mask_fisher
from .expand import NodeWeights, Normalize, Scheme, Weight, mean_fisher_weight, tensor_weight
from .sparsify import Sparsify, merge_task_vectors


class Uncovered(str, enum.Enum):
    """What tensors no mask node covers (norms, embeddings, biases after a sum, routers, ...) get."""

    AVERAGE = "average"  # the plain weight-averaged mean, as `linear`
    BASE = "base"  # the base model's tensor, unchanged
    MEAN_FISHER = "mean_fisher"  # weighted by the mean Fisher of the layer's block (model mean outside layers)


@functools.lru_cache(maxsize=256)
def _cached_node_weights(
    path: str, stamp: Tuple[int, int], normalize: Normalize, power: float
) -> Tuple[NodeWeights, str]:
    fisher = load_mask_fisher(path)
    return NodeWeights.from_fisher(fisher, normalize, power), fisher.shape.model_type


def _stamp(path: str) -> Tuple[int, int]:
    """Cache key part that changes when a file is rewritten, so a re-calibrated file is never served stale."""
    stat = os.stat(path) if os.path.isfile(path) else None
    return (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)


def node_weights(path: str, normalize: Normalize, power: float = 1.0) -> Tuple[NodeWeights, ArchitectureSpec]:
    """Load (once per file version) a Fisher file's normalized node weights and its architecture."""
    nodes, model_type = _cached_node_weights(os.path.abspath(path), _stamp(path), Normalize(normalize), float(power))
    return nodes, get_architecture(model_type, where=path)


def _members(group: TensorGroup, fisher, method: str = "fisher_mask") -> List[TensorEntry]:
    """Inputs that take part: all models, except a base model given only for its config/head (no Fisher)."""
    members = [entry for entry in group.entries if not (entry.is_base and fisher[entry.id] is None)]
    missing = [str(entry.id) for entry in members if fisher[entry.id] is None]
    if missing:
        raise FisherMaskError(
            f"{method} needs a `fisher` file (or `calibration_data` with mergekit-fisher merge) for every model; "
            f"missing for: {', '.join(missing)}."
        )
    if len(members) < 2:
        raise FisherMaskError(f"{method} merges two or more models; got {len(members)} with a Fisher file.")
    return members


def weighted_average(entries: List[TensorEntry], weights: Iterable[Weight]) -> torch.Tensor:
    """``sum_k w_k theta_k / sum_k w_k`` for scalar or broadcastable weights, in place like `linear`.

    ``weights`` may be a generator, so that full-size weights are produced (read) one model at a time.
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
    result.div_(denominator.to(dtype) if isinstance(denominator, torch.Tensor) else denominator)
    return result.to(first.dtype)


def fisher_mask_merge(
    group: TensorGroup,
    weight: PerInput[Annotated[float, Field(ge=0)]] = 1.0,
    fisher: PerInput[Optional[str]] = None,
    scheme: Scheme = Scheme.NODES,
    normalize: Normalize = Normalize.LAYER,
    uncovered: Uncovered = Uncovered.AVERAGE,
    epsilon: Annotated[float, Field(gt=0)] = 1e-10,
    power: Annotated[float, Field(ge=0)] = 1.0,
    sparsify: Sparsify = Sparsify.NONE,
    density: Annotated[float, Field(gt=0, le=1)] = 1.0,
    consensus: bool = True,
) -> torch.Tensor:
    """Merge one tensor: each model weighted by ``weight * max(F^power, epsilon)``, F its node Fisher along the node
    axis; with ``sparsify``, merge trimmed, sign-elected task vectors over the base model instead."""
    name = group.metadata.name or "<unnamed tensor>"
    members = _members(group, fisher)
    lambdas = [weight[entry.id] for entry in members]
    if sum(lambdas) <= 0:
        raise FisherMaskError(f"fisher_mask: the model weights sum to {sum(lambdas)}; at least one must be positive.")
    if sparsify != Sparsify.NONE and group.base is None:
        raise FisherMaskError(f"fisher_mask: sparsify={sparsify.value} merges task vectors and needs a base_model.")
    loaded = [node_weights(fisher[entry.id], normalize, power) for entry in members]
    spec = loaded[0][1]
    if any(other.name != spec.name for _, other in loaded):
        raise FisherMaskError(f"fisher_mask: Fisher files of different architectures for {name}.")
    stack, layer, rule = spec.locate(name)
    node_fisher = [
        tensor_weight(nodes, stack, rule, layer, entry.tensor, scheme, name=name)
        for (nodes, _), entry in zip(loaded, members)
    ]
    if node_fisher[0] is None:
        if uncovered == Uncovered.BASE:
            if group.base is None:
                raise FisherMaskError(f"fisher_mask: uncovered=base needs a base_model (tensor {name}).")
            return group.base.tensor.clone()
        if uncovered == Uncovered.MEAN_FISHER:
            node_fisher = [mean_fisher_weight(nodes, stack, rule, layer, name=name) for nodes, _ in loaded]
    if node_fisher[0] is None:
        weights: List[Weight] = list(lambdas)
    else:
        weights = [
            lam * (f.clamp_min(epsilon) if isinstance(f, torch.Tensor) else max(f, epsilon))
            for lam, f in zip(lambdas, node_fisher)
        ]
    if sparsify == Sparsify.NONE:
        return weighted_average(members, weights)
    return merge_task_vectors(
        group.base.tensor, [entry.tensor for entry in members], weights, sparsify, density, consensus, name=name
    )


@functools.lru_cache(maxsize=256)
def _cached_reader(path: str, stamp: Tuple[int, int]) -> FullFisherReader:
    return FullFisherReader(path)


def full_fisher_reader(path: str) -> FullFisherReader:
    """Open (once per file version) a full-Fisher folder's index; tensors are read on demand."""
    index = os.path.join(path, INDEX_NAME) if os.path.isdir(path) else path
    return _cached_reader(os.path.abspath(path), _stamp(index))


def fisher_merge(
    group: TensorGroup,
    weight: PerInput[Annotated[float, Field(ge=0)]] = 1.0,
    fisher: PerInput[Optional[str]] = None,
    fisher_floor: Annotated[float, Field(gt=0)] = 1e-6,
    # Off by default: on four real MiniLM tasks raw Fisher merged better (README, Evidence).
    normalize: bool = False,
) -> torch.Tensor:
    """Matena & Raffel: each model weighted by ``weight * max(F / (||F||_2 if normalize), fisher_floor)`` per entry."""
    name = group.metadata.name or "<unnamed tensor>"
    members = _members(group, fisher, method="fisher")
    if sum(weight[e.id] for e in members) <= 0:
        raise FisherMaskError(f"fisher: the model weights sum to zero or less for {name}; one must be positive.")

    def weights():
        # One model's Fisher tensor is read at a time and released after use.
        for entry in members:
            reader = full_fisher_reader(fisher[entry.id])
            if name not in reader:
                raise FisherFileError(f"Full Fisher {fisher[entry.id]} has no tensor {name}; was it measured on this model?")
            values = reader.get(name).to(torch.float32)
            if tuple(values.shape) != tuple(entry.tensor.shape):
                raise FisherFileError(
                    f"Full Fisher {fisher[entry.id]}: {name} has shape {tuple(values.shape)}, the model's tensor "
                    f"{tuple(entry.tensor.shape)}."
                )
            if normalize:
                values.div_(reader.l2_norm)
            yield values.clamp_min_(fisher_floor).mul_(weight[entry.id])

    return weighted_average(members, weights())


FISHER_MASK = merge_method(
    fisher_mask_merge,
    name="fisher_mask",
    pretty_name="Fisher Mask Nodes",
    reference_url="https://arxiv.org/abs/2403.09891",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
)

FISHER = merge_method(
    fisher_merge,
    name="fisher",
    pretty_name="Fisher-weighted averaging",
    reference_url="https://arxiv.org/abs/2111.09832",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
)

METHODS = (FISHER_MASK, FISHER)


def register() -> None:
    """Register this package's merge methods with mergekit; calling it again is a no-op."""
    known = {method.spec.name for method in merge_methods.registered_methods()}
    for method in METHODS:
        if method.spec.name not in known:
            merge_methods.register(method)
