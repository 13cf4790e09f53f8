"""Expand a model's node Fisher into a merge weight shaped for one tensor.

The result broadcasts against the tensor (a ``[n, 1]`` column, a ``[n]`` row, ``[E, n, 1]`` for experts, or a
scalar), so the merge never materialises a full-size weight. ``None`` means no node covers the tensor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

from ..architectures import Kind, Role, Stack, TensorRule, get_architecture
from ..errors import FisherFileError
from ..files import MaskFisher

Weight = Union[torch.Tensor, float]


class Scheme(str, enum.Enum):
    NODES = "nodes"  # every row/column a node scales gets that node's Fisher
    PAPER = "paper"  # the authors' mapping: per-head Q/K, layer means for V/O/norms, model mean for embeddings


class Normalize(str, enum.Enum):
    NONE = "none"  # raw Fisher, as in the paper
    MODEL = "model"  # each node group scaled to mean 1 over the model
    LAYER = "layer"  # within every layer, each node group scaled to mean 1
    LAYER_MEDIAN = "layer_median"  # within every layer, each node group scaled to median 1 (robust to a few outliers)


def normalized(values: torch.Tensor, normalize: Normalize) -> torch.Tensor:
    """Node Fisher (L, ...) scaled as ``normalize`` says; an all-zero model or layer stays zero (a layer whose median
    is zero falls back to its mean)."""
    normalize = Normalize(normalize)
    if normalize == Normalize.NONE:
        return values
    dims = tuple(range(values.dim())) if normalize == Normalize.MODEL else tuple(range(1, values.dim()))
    scale = values.mean(dim=dims, keepdim=True)
    if normalize == Normalize.LAYER_MEDIAN:
        median = values.flatten(1).median(dim=1).values.view(scale.shape)  # (L, 1, ...)
        scale = torch.where(median > 0, median, scale)
    return torch.where(scale > 0, values / scale.clamp_min(torch.finfo(values.dtype).tiny), values)


@dataclass(frozen=True)
class NodeWeights:
    """A model's normalized node Fisher, ready to expand: one tensor per group key (``head_fisher``, ...), and the
    "universal" weight of tensors outside every layer (embeddings, pooler) under the ``paper`` scheme."""

    groups: Dict[str, torch.Tensor]
    num_kv_heads: int
    head_dim: int
    universal: float

    @classmethod
    def from_fisher(
        cls, fisher: MaskFisher, normalize: Normalize, power: float = 1.0, epsilon: float = 0.0
    ) -> "NodeWeights":
        """``F ** power`` (0: every node alike, the plain average), normalized, then floored at ``epsilon`` times
        its group's mean in that layer. Every step is scale-free: multiplying every model's Fisher by one constant
        changes no merge."""
        groups = {}
        for key, values in fisher.groups.items():
            values = normalized(values if power == 1 else values**power, normalize)
            if epsilon > 0:
                layer_mean = values.mean(dim=tuple(range(1, values.dim())), keepdim=True)  # (L, 1, ...)
                values = torch.maximum(values, epsilon * layer_mean)
            groups[key] = values
        spec = get_architecture(fisher.shape.model_type)
        return cls(groups, fisher.shape.num_kv_heads, fisher.shape.head_dim, _universal(spec, groups))

    def layer(self, stack: Stack, group: str, layer: int, *, name: str) -> torch.Tensor:
        values = self.groups.get(stack.key(group))
        if values is None:
            raise FisherFileError(f"Tensor {name}: the Fisher file has no {stack.key(group)} group.")
        if layer >= values.shape[0]:
            raise FisherFileError(f"Tensor {name}: layer {layer} is outside the Fisher file's {values.shape[0]} layers.")
        return values[layer]

    def kv_heads(self, heads: torch.Tensor) -> torch.Tensor:
        """GQA: a key/value head's Fisher is the sum over the query heads that read it."""
        return heads.view(self.num_kv_heads, -1).sum(dim=1)  # (KV, H / KV) -> (KV,)


def tensor_weight(
    nodes: NodeWeights,
    stack: Optional[Stack],
    rule: Optional[TensorRule],
    layer: Optional[int],
    tensor: torch.Tensor,
    scheme: Scheme,
    *,
    name: str,
) -> Optional[Weight]:
    """The weight for ``tensor`` (named ``name``): a broadcastable tensor, a scalar, or None if uncovered."""
    if rule is None or rule.role == Role.ROUTER:
        return None
    role, paper = rule.role, scheme == Scheme.PAPER
    if role == Role.EMBEDDING:
        return nodes.universal if paper else None
    if stack is None or layer is None:
        raise FisherFileError(f"Tensor {name}: a layer tensor outside every layer stack.")
    group = rule.group_name
    if role in (Role.O_BIAS, Role.ATTN_NORM, Role.DOWN_BIAS, Role.FFN_NORM):
        if not paper:
            return None  # no node scales these under the "nodes" scheme
        if role in (Role.DOWN_BIAS, Role.FFN_NORM) and stack.key(group) not in nodes.groups:
            group = "expert"  # a mixture's FFN block is its experts
        return float(nodes.layer(stack, group, layer, name=name).mean())
    values = nodes.layer(stack, group, layer, name=name)  # (H,), (D,) or (E, I)
    if role.kind == Kind.EXPERTS:
        if role == Role.EXPERT_DOWN:
            expanded = torch.full_like(values, float(values.mean())) if paper else values  # (E, I)
        else:
            expanded = torch.cat([values, values], dim=1)  # (E, 2I): [gate | up] rows of each expert
        return _along_axis(expanded.flatten(), 1, tensor, rule.axis, name=name, experts=values.shape[0])
    if role.kind == Kind.NEURONS:
        if role == Role.DOWN and paper:
            return float(values.mean())
        node_values = torch.cat([values, values]) if role == Role.UP_PAIR else values
        return _along_axis(node_values, 1, tensor, rule.axis, name=name)
    mean = torch.full_like(values, float(values.mean()))
    if role in (Role.V, Role.O) and paper:
        return float(values.mean())
    kv = nodes.kv_heads(values)
    node_values = {
        Role.Q: values,
        Role.O: values,
        Role.HEADWISE: values,
        Role.K: kv,
        Role.V: kv,
        Role.QKV: torch.cat([values, kv, torch.full_like(kv, float(values.mean())) if paper else kv]),  # [q | k | v]
        Role.QKV_PER_HEAD: torch.stack([values, values, mean if paper else values], dim=1).flatten(),  # (H, 3) per head
    }[role]
    block = 1 if role == Role.HEADWISE else nodes.head_dim  # a head owns head_dim rows/columns
    return _along_axis(node_values, block, tensor, rule.axis, name=name)


def mean_fisher_weight(
    nodes: NodeWeights, stack: Optional[Stack], rule: Optional[TensorRule], layer: Optional[int], *, name: str
) -> float:
    """The paper's mean-Fisher rule for a tensor no node covers: the mean of its block's group in its layer (every
    group of the layer for a tensor without a role), or the universal weight outside layers."""
    if stack is None or layer is None:
        return nodes.universal
    if rule is not None and rule.role != Role.EMBEDDING:
        group = rule.group_name
        if stack.key(group) not in nodes.groups and group == "ffn":
            group = "expert"
        if stack.key(group) in nodes.groups:
            return float(nodes.layer(stack, group, layer, name=name).mean())
    return float(torch.cat([nodes.layer(stack, g, layer, name=name).flatten() for g in stack.sites]).mean())


def _along_axis(
    node_values: torch.Tensor, block: int, tensor: torch.Tensor, axis: int, *, name: str, experts: int = 0
) -> torch.Tensor:
    """Repeat each node's value over the ``block`` entries it owns, shaped to broadcast along ``axis``.

    With ``experts``, ``node_values`` holds each expert's values in turn and axis 0 of the tensor is the expert.
    """
    per_expert = node_values.numel() // experts if experts else node_values.numel()
    expected = per_expert * block
    if axis >= tensor.ndim or tensor.shape[axis] != expected or (experts and tensor.shape[0] != experts):
        raise FisherFileError(
            f"Tensor {name} has shape {tuple(tensor.shape)}; the Fisher file's nodes expect {expected} entries "
            f"along axis {axis}{f' for each of {experts} experts' if experts else ''}. The Fisher file was measured "
            "on a differently shaped model."
        )
    expanded = node_values.repeat_interleave(block)  # (n,) or (E * n,)
    shape = [1] * tensor.ndim
    shape[axis] = expected
    if experts:
        shape[0] = experts
    return expanded.view(shape)  # (n, 1) for rows, (n,) for columns, (E, n, 1) / (E, 1, n) for experts


def _universal(spec, groups: Dict[str, torch.Tensor]) -> float:
    """The authors' weight for embeddings and pooler: the mean over layers of the sum of the layer's group means
    (for BERT, mean over layers of mean(heads) + mean(neurons)); every stack's layers count."""
    per_layer = []
    for stack in spec.stacks:
        keys = [stack.key(group) for group in stack.sites if stack.key(group) in groups]
        if keys:
            means = [groups[key].flatten(1).double().mean(dim=1) for key in keys]  # (L,) each
            per_layer.append(torch.stack(means).sum(dim=0))
    return float(torch.cat(per_layer).mean()) if per_layer else 0.0
