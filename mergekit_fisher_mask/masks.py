"""Mask nodes: scalars on each attention head's output and each FFN neuron, applied with forward pre-hooks.

transformers 5 has no ``head_mask``, so a head mask ``m[l, h]`` scales head ``h``'s slice of the input of the
attention output projection, and a neuron mask ``m[l, i]`` scales channel ``i`` of the input of the FFN down
projection. Masks are per example, shape ``(L, B, H)`` and ``(L, B, D)``: one backward pass of the summed loss then
gives every example's own gradient ``dL_n/dm`` in row ``n``. At ``m = 1`` the model's outputs are unchanged.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .architectures import ArchitectureSpec, NodeShape


class _HeadMaskHook:
    """Scale each head's slice of the attention output projection's input by its mask."""

    def __init__(self, nodes: "MaskNodes", layer: int):
        self.nodes, self.layer = nodes, layer

    def __call__(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        masks = self.nodes.head_masks
        if masks is None:
            return None
        x, *rest = args
        batch, seq, width = x.shape
        heads = self.nodes.shape.num_heads
        mask = masks[self.layer].to(x.dtype)  # (B, H)
        x = x.reshape(batch, seq, heads, width // heads) * mask[:, None, :, None]  # (B, T, H, d)
        return (x.reshape(batch, seq, width), *rest)  # (B, T, H * d)


class _NeuronMaskHook:
    """Scale each channel of the FFN down projection's input by its mask."""

    def __init__(self, nodes: "MaskNodes", layer: int):
        self.nodes, self.layer = nodes, layer

    def __call__(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        masks = self.nodes.ffn_masks
        if masks is None:
            return None
        x, *rest = args
        mask = masks[self.layer].to(x.dtype)  # (B, D)
        return (x * mask[:, None, :], *rest)  # (B, T, D)


def layer_modules(model: nn.Module, spec: ArchitectureSpec) -> List[nn.Module]:
    """The transformer layers of a model, with or without a task head around the body."""
    return list(model.base_model.get_submodule(spec.layers))


class MaskNodes:
    """Context manager that installs the mask hooks on a model and removes them on exit, even after an error."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, shape: NodeShape):
        self.model, self.spec, self.shape = model, spec, shape
        self.head_masks: Optional[torch.Tensor] = None  # (L, B, H)
        self.ffn_masks: Optional[torch.Tensor] = None  # (L, B, D)
        self._handles: list = []

    def __enter__(self) -> "MaskNodes":
        layers = layer_modules(self.model, self.spec)
        if len(layers) != self.shape.num_layers:
            raise RuntimeError(f"found {len(layers)} layers at {self.spec.layers!r}, config says {self.shape.num_layers}")
        try:
            for index, layer in enumerate(layers):
                head_target = layer.get_submodule(self.spec.head_module)
                neuron_target = layer.get_submodule(self.spec.neuron_module)
                self._handles.append(head_target.register_forward_pre_hook(_HeadMaskHook(self, index)))
                self._handles.append(neuron_target.register_forward_pre_hook(_NeuronMaskHook(self, index)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.head_masks = self.ffn_masks = None

    def new_masks(self, batch_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Fresh all-ones per-example masks that require grad; the hooks use them until the next call."""
        shape = self.shape
        self.head_masks = torch.ones(shape.num_layers, batch_size, shape.num_heads, device=device, requires_grad=True)
        self.ffn_masks = torch.ones(
            shape.num_layers, batch_size, shape.intermediate_size, device=device, requires_grad=True
        )
        return self.head_masks, self.ffn_masks
