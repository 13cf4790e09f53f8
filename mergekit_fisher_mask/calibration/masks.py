"""Mask nodes: scalars on each attention head's output, each FFN neuron and each routed expert's neuron.

transformers 5 has no ``head_mask``, so the masks are applied where the architecture table says:

* heads: a forward pre-hook scales head ``h``'s slice of the input of the attention output projection;
* neurons: a forward pre-hook scales channel ``i`` of the input of the FFN down projection;
* experts: the experts module runs an eager version of its forward that scales each expert's activation
  ``act(gate) * up`` per neuron (no module receives that activation, so there is nothing to hook).

Masks are per example, ``(B, W)`` for every layer and group (``(B, E, I)`` for experts): one backward pass of the
summed loss then gives every example's own gradient in its row. At ``m = 1`` the model's outputs are unchanged.

Each layer's masks are created the first time the layer runs, on the device its input arrives on, so they live on
the layer's execution device whatever the device map; a recomputation under activation checkpointing reuses them.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import ArchitectureSpec, Kind, NodeShape, NodeSite, Stack
from ..errors import FisherMaskError


@dataclass(frozen=True)
class _Site:
    key: str  # the group's file key
    layer: int
    site: NodeSite
    width: Tuple[int, ...]  # (H,), (D,) or (E, I)


class _MaskHook:
    """Scale the input of a node group's projection by the mask: each head's ``head_dim`` slice of the attention
    output projection's input, or each channel of the FFN down projection's input."""

    def __init__(self, nodes: "MaskNodes", site: _Site):
        self.nodes, self.site = nodes, site

    def __call__(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if self.nodes.batch_size is None:
            return None
        x, *rest = args
        count = self.site.width[0]  # H heads or D neurons
        mask = self.nodes.mask(self.site, x.device).to(x.dtype)  # (B, N)
        # (B, T, N, d) with d = head_dim for heads and 1 for neurons; also for flattened (B*T, ...) inputs
        viewed = x.reshape(self.nodes.batch_size, -1, count, x.shape[-1] // count)
        return ((viewed * mask[:, None, :, None]).reshape(x.shape), *rest)


def _masked_experts_forward(nodes: "MaskNodes", site: _Site):
    """An eager experts forward (as transformers' own, for fused [E, 2I, H] / [E, H, I] experts) whose activation
    ``act(gate) * up`` of expert ``e`` is scaled by the mask row of each token's example."""

    def forward(experts, hidden_states, top_k_index, top_k_weights):
        if nodes.batch_size is None:
            return experts.__class__.forward(experts, hidden_states, top_k_index, top_k_weights)
        tokens = hidden_states.shape[0]  # (B * T, H): the sparse block flattens the batch
        mask = nodes.mask(site, hidden_states.device)  # (B, E, I)
        example = torch.arange(tokens, device=hidden_states.device) // (tokens // nodes.batch_size)  # (B * T,)
        final = torch.zeros_like(hidden_states)
        gate_up = getattr(experts, site.site.gate_up)  # (E, 2I, H)
        down = getattr(experts, site.site.weight)  # (E, H, I)
        act = getattr(experts, site.site.activation)
        num_experts = gate_up.shape[0]
        with torch.no_grad():  # experts some token was routed to (index num_experts marks a dropped slot)
            counts = torch.bincount(top_k_index.flatten(), minlength=num_experts + 1)[:num_experts]
            hits = counts.nonzero().flatten().tolist()
        for expert in hits:
            token_index, top_k_position = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token_index], gate_up[expert]).chunk(2, dim=-1)  # (n, I) each
            activation = act(gate) * up * mask[example[token_index], expert].to(up.dtype)  # (n, I)
            out = F.linear(activation, down[expert]) * top_k_weights[token_index, top_k_position, None]
            final.index_add_(0, token_index, out.to(final.dtype))
        return final

    return forward


def layer_modules(model: nn.Module, stack: Stack) -> List[nn.Module]:
    """The layers of one stack, with or without a task head around the body."""
    return list(model.base_model.get_submodule(stack.layers))


def all_layers(model: nn.Module, spec: ArchitectureSpec) -> List[nn.Module]:
    return [layer for stack in spec.stacks for layer in layer_modules(model, stack)]


class MaskNodes:
    """Context manager that installs the masks on a model and removes them on exit, even after an error."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, shape: NodeShape):
        self.model, self.spec, self.shape = model, spec, shape
        self.batch_size: Optional[int] = None  # None: masks pass inputs through unchanged
        self.sites: List[_Site] = []
        self.masks: Dict[_Site, torch.Tensor] = {}
        self._undo: list = []

    def __enter__(self) -> "MaskNodes":
        shapes = self.shape.group_shapes()
        try:
            for stack in self.spec.stacks:
                layers = layer_modules(self.model, stack)
                expected = self.shape.num_decoder_layers if stack.decoder else self.shape.num_layers
                if len(layers) != expected:
                    raise FisherMaskError(
                        f"{type(self.model).__name__} has {len(layers)} layers at {stack.layers!r}, but its config "
                        f"says {expected}. Calibrate the model as saved, with its own config.json."
                    )
                for group, node_site in stack.sites.items():
                    key = stack.key(group)
                    for index, layer in enumerate(layers):
                        site = _Site(key, index, node_site, shapes[key][1:])
                        self.sites.append(site)
                        self._install(layer.get_submodule(node_site.module), site)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _install(self, module: nn.Module, site: _Site) -> None:
        if site.site.kind == Kind.EXPERTS:
            own = "forward" in vars(module)
            previous = module.forward
            module.forward = types.MethodType(_masked_experts_forward(self, site), module)
            self._undo.append(lambda: setattr(module, "forward", previous) if own else delattr(module, "forward"))
            return
        hook = _MaskHook(self, site)
        self._undo.append(module.register_forward_pre_hook(hook).remove)

    def __exit__(self, *_exc_info) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.sites.clear()
        self.batch_size = None
        self.masks = {}

    def reset(self, batch_size: int) -> None:
        """Start a micro-batch of ``batch_size`` examples: fresh all-ones masks, made as each layer runs."""
        self.batch_size = batch_size
        self.masks = {}

    def mask(self, site: _Site, device: torch.device) -> torch.Tensor:
        if site not in self.masks:
            self.masks[site] = torch.ones(self.batch_size, *site.width, device=device, requires_grad=True)
        return self.masks[site]

    def created(self) -> List[Tuple[_Site, torch.Tensor]]:
        """(site, mask) for every site of the current micro-batch, in table order."""
        missing = [site for site in self.sites if site not in self.masks]
        if missing:
            raise FisherMaskError(
                f"The forward pass never reached the {missing[0].key} mask of layer {missing[0].layer}. A custom "
                "forward_fn must run every layer of the model (no early exit, no layer skipping)."
            )
        return [(site, self.masks[site]) for site in self.sites]
