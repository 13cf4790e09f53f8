"""Expand a model's per-head and per-neuron Fisher into a merge weight shaped for one tensor.

The result broadcasts against the tensor (a ``[n, 1]`` column, a ``[n]`` row, or a scalar), so the merge never
materialises a full-size weight. ``None`` means no node covers the tensor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..architectures import Role, TensorRule
from ..errors import FisherFileError
from ..files import MaskFisher

Weight = Union[torch.Tensor, float]


class Scheme(str, enum.Enum):
    NODES = "nodes"  # every row/column a node scales gets that node's Fisher
    PAPER = "paper"  # the authors' mapping: per-head Q/K, layer means for V/O/norms, model mean for embeddings


class Normalize(str, enum.Enum):
    NONE = "none"  # raw Fisher, as in the paper
    MODEL = "model"  # head and neuron Fisher each scaled to mean 1 over the model
    LAYER = "layer"  # within every layer, head and neuron Fisher each scaled to mean 1


@dataclass(frozen=True)
class NodeWeights:
    """A model's normalized node Fisher, ready to expand."""

    head: torch.Tensor  # (L, H)
    ffn: torch.Tensor  # (L, D)
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_fisher(cls, fisher: MaskFisher, normalize: Normalize) -> "NodeWeights":
        return cls(
            head=normalized(fisher.head, normalize),
            ffn=normalized(fisher.ffn, normalize),
            num_kv_heads=fisher.shape.num_kv_heads,
            head_dim=fisher.shape.head_dim,
        )

    def kv_head(self, layer: int) -> torch.Tensor:
        """GQA: a key/value head's Fisher is the sum over the query heads that read it."""
        heads = self.head[layer]  # (H,)
        return heads.view(self.num_kv_heads, -1).sum(dim=1)  # (KV, H / KV) -> (KV,)

    def model_mean(self) -> float:
        """Mean over all nodes of the model, heads and neurons together."""
        return float(torch.cat([self.head.flatten(), self.ffn.flatten()]).mean())


def normalized(values: torch.Tensor, normalize: Normalize) -> torch.Tensor:
    """Node Fisher (L, K) scaled as ``normalize`` says; an all-zero model or layer stays zero."""
    if Normalize(normalize) == Normalize.NONE:
        return values
    dims: Tuple[int, ...] = (0, 1) if normalize == Normalize.MODEL else (1,)
    mean = values.mean(dim=dims, keepdim=True)
    return torch.where(mean > 0, values / mean.clamp_min(torch.finfo(values.dtype).tiny), values)


def tensor_weight(
    nodes: NodeWeights,
    rule: Optional[TensorRule],
    layer: Optional[int],
    tensor: torch.Tensor,
    scheme: Scheme,
    *,
    name: str,
) -> Optional[Weight]:
    """The weight for ``tensor`` (named ``name``): a broadcastable vector, a scalar, or None if uncovered."""
    if rule is None:
        return None
    role = rule.role
    if role == Role.EMBEDDING:
        return nodes.model_mean() if scheme == Scheme.PAPER else None
    if layer is None or layer >= nodes.head.shape[0]:
        raise FisherFileError(f"Tensor {name}: layer {layer} is outside the Fisher file's {nodes.head.shape[0]} layers.")
    heads, neurons = nodes.head[layer], nodes.ffn[layer]  # (H,), (D,)
    paper = scheme == Scheme.PAPER
    per_node = {
        Role.Q: heads,
        Role.K: nodes.kv_head(layer),
        Role.V: nodes.kv_head(layer),
        Role.O: heads,
        Role.UP: neurons,
        Role.DOWN: neurons,
    }
    if paper and role in (Role.V, Role.O, Role.O_BIAS, Role.ATTN_NORM):
        return float(heads.mean())
    if paper and role in (Role.DOWN, Role.DOWN_BIAS, Role.FFN_NORM):
        return float(neurons.mean())
    if role in (Role.O_BIAS, Role.ATTN_NORM, Role.DOWN_BIAS, Role.FFN_NORM):
        return None  # no node scales these under the "nodes" scheme
    if role == Role.QKV:
        kv = nodes.kv_head(layer)
        value = torch.full_like(kv, float(heads.mean())) if paper else kv
        node_values = torch.cat([heads, kv, value])  # fused [q | k | v]
    else:
        node_values = per_node[role]
    block = 1 if role in (Role.UP, Role.DOWN) else nodes.head_dim  # a head owns head_dim rows/columns
    return _along_axis(node_values, block, tensor, rule.axis, name=name)


def _along_axis(node_values: torch.Tensor, block: int, tensor: torch.Tensor, axis: int, *, name: str) -> torch.Tensor:
    """Repeat each node's value over the ``block`` rows/columns it owns, shaped to broadcast along ``axis``."""
    expected = node_values.numel() * block
    if axis >= tensor.ndim or tensor.shape[axis] != expected:
        raise FisherFileError(
            f"Tensor {name} has shape {tuple(tensor.shape)}; the Fisher file's nodes expect {expected} entries "
            f"along axis {axis}. The Fisher file was measured on a differently shaped model."
        )
    expanded = node_values.repeat_interleave(block)  # (n,)
    shape = [1] * tensor.ndim
    shape[axis] = expected
    return expanded.view(shape)  # (n, 1) for rows, (n,) for columns
