"""The mask pass: the Fisher information of every attention-head and FFN-neuron mask node over a dataloader.

All parameters are frozen, so autograd computes mask gradients only: the cost is about one forward plus one
activation-only backward per batch. Estimators: see :class:`mergekit_fisher_mask.settings.Estimator`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..architectures import NodeShape, get_architecture
from ..errors import FisherMaskError
from ..files import GramStats, MaskFisher
from ..settings import Aggregate, CalibrationSettings, Estimator, MixedPrecision
from ..tasks import Task
from .engine import CalibrationPass, PassContext, PreparedCalibration, Rider, run_pass, with_overrides
from .gram_pass import GramInputs, check_sites
from .losses import IGNORE, TARGETS, Batch, LabelSampler, classifier_logits, per_example_losses
from .masks import MaskNodes, all_layers
from .placement import checkpointed, return_freed_weights_to_the_os

ForwardFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class GroupSums:
    """Running sums per node group and layer, each on the device its layer runs on; gathered to the CPU once."""

    def __init__(self, shapes: Dict[str, Tuple[int, ...]]):
        self.shapes = shapes  # group key -> (L, *width)
        self.values: Dict[Tuple[str, int], torch.Tensor] = {}

    def add(self, key: str, layer: int, value: torch.Tensor) -> None:
        current = self.values.get((key, layer))
        self.values[(key, layer)] = value.double() if current is None else current + value.double()

    def gather(self) -> Dict[str, torch.Tensor]:
        """Group key -> (L, *width) float64 on the CPU; a layer no example reached is zero."""
        out = {}
        for key, (layers, *width) in self.shapes.items():
            rows = [self.values[(key, i)].cpu() if (key, i) in self.values else torch.zeros(width, dtype=torch.float64)
                    for i in range(layers)]
            out[key] = torch.stack(rows)
        return out


def auto_micro_batch_size(
    shape: NodeShape, length: int, budget_bytes: int, *, dtype_bytes: int = 4, checkpointing: bool = False
) -> int:
    """Examples per backward pass so that saved activations stay near ``budget_bytes`` (a rough estimate)."""
    # Per token, backward keeps roughly six hidden-sized and four FFN-sized activations of every layer; under
    # checkpointing only each layer's input, plus one layer's activations while it is recomputed.
    ffn = shape.intermediate_size + 2 * shape.expert_size  # a mixture: about two routed experts per token
    layers = shape.num_layers + shape.num_decoder_layers
    layer = 6 * shape.hidden_size + 4 * ffn
    per_layer_total = layers * shape.hidden_size + layer if checkpointing else layers * layer
    return max(1, budget_bytes // (per_layer_total * dtype_bytes * max(length, 1)))


def _micro_batches(batch: Batch, size: int):
    """Split a right-padded batch into micro-batches, each trimmed to its longest example (and longest target)."""
    total, width = batch["input_ids"].shape
    mask = batch["attention_mask"]  # (B, T), 1 for real tokens
    if bool((mask[:, 1:] > mask[:, :-1]).any()):  # a real token after a pad: left padding (or holes)
        raise FisherMaskError(
            "The calibration batches are not right-padded (an attention_mask row has a real token after padding). "
            "Pad on the right (tokenizer.padding_side = 'right'): trimming and absolute positions assume it."
        )
    for start in range(0, total, size):
        part = {key: value[start : start + size] for key, value in batch.items()}
        length = int(part["attention_mask"].sum(dim=1).max())
        if TARGETS in part:
            targets = part[TARGETS]
            part[TARGETS] = targets[:, : int((targets != IGNORE).sum(dim=1).max())]
        # Trim every (B, T) tensor that runs along the sequence (input_ids, attention_mask, token_type_ids, labels, ...).
        yield {key: value[:, :length] if value.dim() == 2 and value.shape[1] == width and key != TARGETS else value
               for key, value in part.items()}


class _MaskStep:
    """One batch of the mask pass: micro-batches, fresh masks, one backward each, per-group sums."""

    def __init__(self, model, nodes: MaskNodes, task: Task, estimator: Estimator, forward_fn, seed: int, micro,
                 aggregate: Aggregate = Aggregate.MEAN, lm_chunk_bytes: Optional[int] = None,
                 rider: Optional[Rider] = None):
        self.model, self.nodes, self.task, self.estimator, self.aggregate = model, nodes, task, estimator, aggregate
        self.forward_fn, self.sampler, self.micro = forward_fn, LabelSampler(seed), micro
        self.lm_chunk_bytes, self.rider = lm_chunk_bytes, rider
        self.sums = GroupSums(nodes.shape.group_shapes())

    def __call__(self, batch: Batch) -> None:
        batch_size, length = batch["input_ids"].shape
        gradient_sums: Dict[tuple, torch.Tensor] = {}  # ``batch`` estimator: summed over the batch's micro-batches
        for part in _micro_batches(batch, self.micro(length)):
            self.nodes.reset(part["input_ids"].shape[0])
            for site, value in self._contribution(part):
                if self.estimator.per_batch:
                    gradient_sums[(site.key, site.layer)] = gradient_sums.get((site.key, site.layer), 0) + value.double()
                else:
                    self.sums.add(site.key, site.layer, value)
        for (key, layer), value in gradient_sums.items():  # square the gradient of the batch's mean loss
            self.sums.add(key, layer, (value / batch_size) ** 2)

    def _contribution(self, batch: Batch) -> List[tuple]:
        """(site, value) per mask: sums over the micro-batch of squared per-example gradients (or of gradients for
        the ``batch`` estimator), shaped like one example's mask."""
        if self.estimator == Estimator.EXPECTED:
            with self._observing(batch):
                log_probs = torch.log_softmax(classifier_logits(self.model, batch), dim=-1)  # (B, C)
            sites, masks = zip(*self.nodes.created())
            probs = log_probs.exp().detach()
            out = [torch.zeros(m.shape[1:], device=m.device) for m in masks]
            classes = log_probs.shape[-1]
            for c in range(classes):
                grads = torch.autograd.grad(log_probs[:, c].sum(), masks, retain_graph=c < classes - 1)
                for acc, grad in zip(out, grads):
                    acc += torch.tensordot(probs[:, c].to(grad.device), grad.float() ** 2, dims=1)  # (B,) . (B, ...)
            return list(zip(sites, out))
        with self._observing(batch):
            losses = self._losses(batch)  # (B,)
        sites, masks = zip(*self.nodes.created())
        grads = torch.autograd.grad(losses.sum(), masks)  # row n of each (B, ...) gradient is dL_n/dm
        if self.estimator.per_batch:
            return [(site, grad.float().sum(dim=0)) for site, grad in zip(sites, grads)]
        squares = [grad.float() ** 2 for grad in grads]  # (B, ...) per site
        if self.aggregate == Aggregate.NORMALIZED:  # each example's squared gradients sum to 1 over the model
            totals = sum(s.flatten(1).sum(dim=1).double().cpu() for s in squares)  # (B,)
            scale = 1 / totals.clamp_min(torch.finfo(torch.float64).tiny)
            squares = [s * scale.to(s.device, s.dtype).view(-1, *([1] * (s.dim() - 1))) for s in squares]
        return [(site, s.sum(dim=0)) for site, s in zip(sites, squares)]

    def _observing(self, batch: Batch):
        """The rider observes the forward only: a layer recomputed during backward is not counted again."""
        return self.rider.observing(batch) if self.rider is not None else contextlib.nullcontext()

    def _losses(self, batch: Batch) -> torch.Tensor:
        if self.forward_fn is not None:
            return self.forward_fn(self.model, batch)
        sampler = self.sampler if self.estimator == Estimator.SAMPLED else None
        return per_example_losses(self.model, batch, self.task, sampler, lm_chunk_bytes=self.lm_chunk_bytes)


def micro_batch_sizer(
    model: torch.nn.Module, context: PassContext, *, activation_budget_bytes: Optional[int] = None
) -> Callable[[int], int]:
    """``size(length)``: examples per backward pass for batches of ``length`` tokens, as the pass chooses them (the
    settings' ``micro_batch_size``, else as many as fit the activation budget of the execution device)."""
    settings, placement = context.settings, context.placement
    budget = activation_budget_bytes or placement.activation_budget()
    activation_bytes = 2 if settings.mixed_precision != MixedPrecision.NO else model.dtype.itemsize

    def size(length: int) -> int:
        return settings.micro_batch_size or auto_micro_batch_size(
            context.shape, length, budget, dtype_bytes=activation_bytes, checkpointing=placement.checkpointing
        )

    return size


def compute_mask_fisher(
    model,
    dataloader,
    settings: Optional[CalibrationSettings] = None,
    *,
    accelerator=None,
    forward_fn: Optional[ForwardFn] = None,
    progress: bool = True,
    activation_budget_bytes: Optional[int] = None,
    rider: Optional[Rider] = None,
    **overrides,
) -> Tuple[Dict[str, torch.Tensor], int]:
    """Return ``({group key: Fisher}, N)``: float32 CPU tensors, the mean over all N examples of every process (the
    ``batch`` estimator: the sum over batches).

    ``settings`` (default: the defaults, with keyword ``overrides`` such as ``estimator="batch"``) decide the
    estimator, aggregate, seed, mixed precision and micro-batch size. Group keys are the mask-Fisher file's tensor
    names (``head_fisher`` (L, H), ``ffn_fisher`` (L, D), ``expert_fisher`` (L, E, I), ...; see
    :mod:`mergekit_fisher_mask.architectures`).

    Each batch runs as micro-batches (default: as many examples as fit ``activation_budget_bytes`` of saved
    activations: a share of the free memory of a GPU, 1 GiB on a CPU), each trimmed to its own longest example. The
    result does not depend on the split: per-example estimators sum per example, and ``batch`` sums the micro-batch
    gradients before squaring.

    ``forward_fn(model, batch) -> (B,)`` overrides the per-example loss (empirical and batch estimators). Batches
    must be right-padded (a left-padded ``attention_mask`` is refused).
    A model dispatched by a device map (``from_pretrained(device_map=...)``) works as it is: masks and sums live on
    each layer's execution device, and offloaded or spread models run their layers under activation checkpointing.
    Parameters are frozen for the pass and restored. A ``rider`` (say entered :class:`~.gram_pass.GramInputs`)
    observes each micro-batch's forward and gets its sums back reduced with the Fisher's.
    """
    settings = with_overrides(settings, overrides)
    context = PassContext.of(model, settings)
    if forward_fn is not None and not settings.estimator.uses_labels:
        raise FisherMaskError("A custom forward_fn defines its own labels; use the empirical or batch estimator.")
    micro = micro_batch_sizer(model, context, activation_budget_bytes=activation_budget_bytes)
    if context.placement.offloaded:
        return_freed_weights_to_the_os()
    layers = all_layers(model, context.spec)
    with MaskNodes(model, context.spec, context.shape) as nodes, checkpointed(layers, context.placement.checkpointing):
        step = _MaskStep(model, nodes, context.task, settings.estimator, forward_fn, settings.seed, micro,
                         settings.aggregate, context.placement.logits_chunk(), rider)
        sums, count = run_pass(model, dataloader, step, step.sums.gather, context=context, accelerator=accelerator,
                               description="Mask Fisher" + (" and Gram matrices" if rider else ""),
                               progress=progress, rider=rider)
    return {key: value.float() for key, value in sums.items()}, count


def measure(run: PreparedCalibration, *, progress: bool = True) -> Tuple[Dict[str, object], int]:
    """The mask pass over a prepared run: the fields of its :class:`MaskFisher` and N."""
    groups, count = compute_mask_fisher(run.model, run.loader, run.settings, accelerator=run.accelerator,
                                        progress=progress)
    return {"groups": groups}, count


def measure_with_grams(run: PreparedCalibration, *, progress: bool = True):
    """The mask pass carrying RegMean's Gram hooks, so one pass over the data measures both: the fields of its
    :class:`MaskFisher` and of its :class:`GramStats` (of the same examples), by record type, and N."""
    sites = check_sites(run.settings, get_architecture(run.model.config.model_type))
    with GramInputs(run.model, sites) as grams:
        groups, count = compute_mask_fisher(run.model, run.loader, run.settings, accelerator=run.accelerator,
                                            progress=progress, rider=grams)
        return {MaskFisher: {"groups": groups}, GramStats: grams.fields(run.settings)}, count


PASS = CalibrationPass(record=MaskFisher, measure=measure, description="mask Fisher",
                       reads=frozenset({"estimator", "aggregate"}))
