"""The mask pass: the Fisher information of every attention-head and FFN-neuron mask node over a dataloader.

All parameters are frozen, so autograd computes mask gradients only: the cost is about one forward plus one
activation-only backward per batch. Estimators: see :class:`mergekit_fisher_mask.settings.Estimator`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..architectures import NodeShape, get_architecture
from ..errors import FisherMaskError
from ..settings import Estimator, MixedPrecision
from ..tasks import Task, task_of
from .engine import check_estimator, run_pass
from .losses import Batch, LabelSampler, classifier_logits, per_example_losses
from .masks import MaskNodes, layer_modules
from .placement import Placement, checkpointed, return_freed_weights_to_the_os

ForwardFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class LayerSums:
    """Running per-layer sums, each on the device its layer runs on; gathered to the CPU once, at the end."""

    def __init__(self, layers: int, width: int):
        self.width = width
        self.values: List[Optional[torch.Tensor]] = [None] * layers

    def add(self, layer: int, value: torch.Tensor) -> None:
        if self.values[layer] is None:
            self.values[layer] = torch.zeros(self.width, dtype=torch.float64, device=value.device)
        self.values[layer] += value.double()

    def gather(self) -> torch.Tensor:
        """(L, K) float64 on the CPU; a layer no example reached is zero."""
        rows = [torch.zeros(self.width, dtype=torch.float64) if v is None else v.cpu() for v in self.values]
        return torch.stack(rows)


def auto_micro_batch_size(
    shape: NodeShape, length: int, budget_bytes: int, *, dtype_bytes: int = 4, checkpointing: bool = False
) -> int:
    """Examples per backward pass so that saved activations stay near ``budget_bytes`` (a rough estimate)."""
    # Per token, backward keeps roughly six hidden-sized and four FFN-sized activations of every layer; under
    # checkpointing only each layer's input, plus one layer's activations while it is recomputed.
    layer = 6 * shape.hidden_size + 4 * shape.intermediate_size
    per_layer_total = shape.num_layers * shape.hidden_size + layer if checkpointing else shape.num_layers * layer
    return max(1, budget_bytes // (per_layer_total * dtype_bytes * max(length, 1)))


def _micro_batches(batch: Batch, size: int):
    """Split a right-padded batch into micro-batches, each trimmed to its longest example."""
    total = batch["input_ids"].shape[0]
    for start in range(0, total, size):
        part = {key: value[start : start + size] for key, value in batch.items()}
        length = int(part["attention_mask"].sum(dim=1).max())
        yield {key: value[:, :length] if value.dim() == 2 else value for key, value in part.items()}


class _MaskStep:
    """One batch of the mask pass: micro-batches, fresh masks, one backward each, per-layer sums."""

    def __init__(self, model, nodes: MaskNodes, task: Task, estimator: Estimator, forward_fn, seed: int, micro):
        self.model, self.nodes, self.task, self.estimator = model, nodes, task, estimator
        self.forward_fn, self.sampler, self.micro = forward_fn, LabelSampler(seed), micro
        shape = nodes.shape
        self.head = LayerSums(shape.num_layers, shape.num_heads)
        self.ffn = LayerSums(shape.num_layers, shape.intermediate_size)

    def __call__(self, batch: Batch) -> None:
        batch_size, length = batch["input_ids"].shape
        layers = self.nodes.shape.num_layers
        gradient_sums: Dict[int, torch.Tensor] = {}  # ``batch`` estimator: summed over the batch's micro-batches
        for part in _micro_batches(batch, self.micro(length)):
            self.nodes.reset(part["input_ids"].shape[0])
            for index, value in enumerate(self._contribution(part)):
                if self.estimator == Estimator.BATCH:
                    gradient_sums[index] = gradient_sums.get(index, 0) + value.double()
                else:
                    (self.head if index < layers else self.ffn).add(index % layers, value)
        for index, value in gradient_sums.items():  # square the gradient of the batch's mean loss
            (self.head if index < layers else self.ffn).add(index % layers, (value / batch_size) ** 2)

    def _contribution(self, batch: Batch) -> Sequence[torch.Tensor]:
        """Per mask (heads, then neurons, layer by layer): (K,) sums over the micro-batch of squared per-example
        gradients, or of gradients for the ``batch`` estimator."""
        if self.estimator == Estimator.EXPECTED:
            log_probs = torch.log_softmax(classifier_logits(self.model, batch), dim=-1)  # (B, C)
            masks = self.nodes.created()
            probs = log_probs.exp().detach()
            out = [torch.zeros(m.shape[1], device=m.device) for m in masks]
            classes = log_probs.shape[-1]
            for c in range(classes):
                grads = torch.autograd.grad(log_probs[:, c].sum(), masks, retain_graph=c < classes - 1)
                for acc, grad in zip(out, grads):
                    acc += probs[:, c].to(grad.device) @ grad.float() ** 2  # (B,) @ (B, K) -> (K,)
            return out
        losses = self._losses(batch)  # (B,)
        masks = self.nodes.created()
        grads = torch.autograd.grad(losses.sum(), masks)  # row n of each (B, K) gradient is dL_n/dm
        if self.estimator == Estimator.BATCH:
            return [grad.float().sum(dim=0) for grad in grads]  # (K,)
        return [(grad.float() ** 2).sum(dim=0) for grad in grads]  # (B, K) -> (K,)

    def _losses(self, batch: Batch) -> torch.Tensor:
        if self.forward_fn is not None:
            return self.forward_fn(self.model, batch)
        sampler = self.sampler if self.estimator == Estimator.SAMPLED else None
        return per_example_losses(self.model, batch, self.task, sampler)


def compute_mask_fisher(
    model,
    dataloader,
    *,
    estimator=Estimator.EMPIRICAL,
    accelerator=None,
    forward_fn: Optional[ForwardFn] = None,
    seed: int = 0,
    progress: bool = True,
    mixed_precision=MixedPrecision.NO,
    micro_batch_size: Optional[int] = None,
    activation_budget_bytes: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Return ``(head_fisher (L, H), ffn_fisher (L, D), N)`` as float32 CPU tensors, summed over all processes.

    Each batch runs as micro-batches of ``micro_batch_size`` examples (default: as many as fit
    ``activation_budget_bytes`` of saved activations, by default 1 GiB on a CPU), each trimmed to its own longest
    example. The result does not depend on the split: per-example estimators sum per example, and ``batch`` sums
    the micro-batch gradients before squaring.

    ``forward_fn(model, batch) -> (B,)`` overrides the per-example loss (empirical and batch estimators).
    A model dispatched by a device map (``from_pretrained(device_map=...)``) works as it is: masks and sums live on
    each layer's execution device, and offloaded or spread models run their layers under activation checkpointing.
    Parameters are frozen for the pass and restored.
    """
    estimator = Estimator(estimator)
    shape = NodeShape.from_config(model.config)
    spec = get_architecture(shape.model_type)
    task = task_of(model.config)
    check_estimator(estimator, task)
    if forward_fn is not None and not estimator.uses_labels:
        raise FisherMaskError("A custom forward_fn defines its own labels; use the empirical or batch estimator.")
    placement = Placement.of(model, accelerator.device if accelerator is not None else None)
    budget = activation_budget_bytes or placement.activation_budget()
    activation_bytes = 2 if MixedPrecision(mixed_precision) != MixedPrecision.NO else model.dtype.itemsize

    def micro(length: int) -> int:
        return micro_batch_size or auto_micro_batch_size(
            shape, length, budget, dtype_bytes=activation_bytes, checkpointing=placement.checkpointing
        )

    if placement.offloaded:
        return_freed_weights_to_the_os()
    layers = layer_modules(model, spec)
    with MaskNodes(model, spec, shape) as nodes, checkpointed(layers, placement.checkpointing):
        step = _MaskStep(model, nodes, task, estimator, forward_fn, seed, micro)
        sums, count = run_pass(
            model,
            dataloader,
            step,
            lambda: {"head": step.head.gather(), "ffn": step.ffn.gather()},
            estimator=estimator,
            accelerator=accelerator,
            device=placement.input_device,
            description="Mask Fisher",
            progress=progress,
            mixed_precision=mixed_precision,
        )
    return sums["head"].float(), sums["ffn"].float(), count
