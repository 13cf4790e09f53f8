"""Mask nodes: scalars on each attention head's output and each FFN neuron, applied with forward pre-hooks.

transformers 5 has no ``head_mask``, so a head mask ``m[l, h]`` scales head ``h``'s slice of the input of the
attention output projection, and a neuron mask ``m[l, i]`` scales channel ``i`` of the input of the FFN down
projection. Masks are per example, ``(B, H)`` and ``(B, D)`` for every layer: one backward pass of the summed loss
then gives every example's own gradient ``dL_n/dm`` in row ``n``. At ``m = 1`` the model's outputs are unchanged.

Each layer's masks are created the first time the layer runs, on the device its input arrives on, so they live
on the layer's execution device whatever the device map; a recomputation under activation checkpointing reuses
them.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..architectures import ArchitectureSpec, NodeShape


class _HeadMaskHook:
    """Scale each head's slice of the attention output projection's input by its mask."""

    def __init__(self, nodes: "MaskNodes", layer: int):
        self.nodes, self.layer = nodes, layer

    def __call__(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if self.nodes.batch_size is None:
            return None
        x, *rest = args
        batch, seq, width = x.shape
        heads = self.nodes.shape.num_heads
        mask = self.nodes.mask(self.nodes.head, self.layer, heads, x.device).to(x.dtype)  # (B, H)
        x = x.reshape(batch, seq, heads, width // heads) * mask[:, None, :, None]  # (B, T, H, d)
        return (x.reshape(batch, seq, width), *rest)  # (B, T, H * d)


class _NeuronMaskHook:
    """Scale each channel of the FFN down projection's input by its mask."""

    def __init__(self, nodes: "MaskNodes", layer: int):
        self.nodes, self.layer = nodes, layer

    def __call__(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if self.nodes.batch_size is None:
            return None
        x, *rest = args
        size = self.nodes.shape.intermediate_size
        mask = self.nodes.mask(self.nodes.ffn, self.layer, size, x.device).to(x.dtype)  # (B, D)
        return (x * mask[:, None, :], *rest)  # (B, T, D)


def layer_modules(model: nn.Module, spec: ArchitectureSpec) -> List[nn.Module]:
    """The transformer layers of a model, with or without a task head around the body."""
    return list(model.base_model.get_submodule(spec.layers))


class MaskNodes:
    """Context manager that installs the mask hooks on a model and removes them on exit, even after an error."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, shape: NodeShape):
        self.model, self.spec, self.shape = model, spec, shape
        self.batch_size: Optional[int] = None  # None: hooks pass inputs through unchanged
        self.head: List[Optional[torch.Tensor]] = []  # per layer: (B, H) on the layer's device
        self.ffn: List[Optional[torch.Tensor]] = []  # per layer: (B, D)
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
        self.batch_size = None
        self.head, self.ffn = [], []

    def reset(self, batch_size: int) -> None:
        """Start a micro-batch of ``batch_size`` examples: fresh all-ones masks, made as each layer runs."""
        self.batch_size = batch_size
        self.head = [None] * self.shape.num_layers
        self.ffn = [None] * self.shape.num_layers

    def mask(self, masks: List[Optional[torch.Tensor]], layer: int, width: int, device: torch.device) -> torch.Tensor:
        if masks[layer] is None:
            masks[layer] = torch.ones(self.batch_size, width, device=device, requires_grad=True)
        return masks[layer]

    def created(self) -> List[torch.Tensor]:
        """All masks of the current micro-batch, heads then neurons, layer by layer."""
        masks = self.head + self.ffn
        missing = [i % self.shape.num_layers for i, m in enumerate(masks) if m is None]
        if missing:
            raise RuntimeError(f"layer {missing[0]}'s mask hook never ran; is {self.spec.layers!r} the layer list?")
        return masks
