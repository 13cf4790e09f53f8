"""The full pass: diagonal Fisher of every parameter (Matena & Raffel 2021), the baseline mask Fisher is compared with.

Per-example gradients come from ``torch.func``: ``vmap(grad(loss))`` over a chunk of examples, so a chunk costs
one vectorised backward instead of a Python loop over examples. Only running sums of squares are kept; peak
memory is about the model plus ``chunk_size`` per-example gradients (``chunk_size x`` parameter bytes).

transformers turns a 2D attention mask into 4D with code that vmap cannot trace, so each example gets a
hand-built additive 4D mask (padding, plus causality for the families whose table entry is ``causal``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..architectures import Kind, get_architecture
from ..checkpoints import iter_tensor_headers, shard_map
from ..errors import FisherMaskError, SettingsError, option
from ..files import FullFisher
from ..settings import CalibrationSettings, Estimator
from ..tasks import Task, task_of
from .engine import CalibrationPass, PassContext, PreparedCalibration, run_pass, with_overrides
from .losses import Batch, LabelSampler, lm_target_weights, model_inputs, per_example_losses


def _additive_mask(attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """(T,) 0/1 padding mask -> (1, 1, T, T) additive mask that vmap can trace."""
    length = attention_mask.shape[0]
    keep = attention_mask.bool()[None, :].expand(length, length)  # (T_q, T_k)
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()
    # Rows of padded queries may be fully masked; give them their own key so softmax stays finite.
    keep = keep | torch.eye(length, dtype=torch.bool, device=keep.device)
    return torch.zeros(length, length, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)[
        None, None
    ]


def _example_loss(model, task: Task, causal: bool, params, buffers, inputs, weights, label) -> torch.Tensor:
    """Loss of one example (vmapped): mean next-token CE for LMs, CE/MSE for classifiers. ``inputs`` holds the
    example's model inputs, each (T,): ``input_ids``, its 0/1 ``attention_mask`` and e.g. ``token_type_ids``."""
    mask = _additive_mask(inputs["attention_mask"], causal=causal, dtype=torch.float32)
    inputs = {**{k: v[None] for k, v in inputs.items()}, "attention_mask": mask}  # (1, T) each; mask (1, 1, T, T)
    logits = functional_call(model, (params, buffers), (), inputs).logits.float()
    if task == Task.CAUSAL_LM:
        token_loss = F.cross_entropy(logits[0, :-1], label[1:], reduction="none")  # (T-1,)
        return (token_loss * weights).sum()
    if task == Task.REGRESSION:
        return (logits[0, 0] - label.float()) ** 2
    return F.cross_entropy(logits, label[None])  # logits (1, C)


class _FullStep:
    """One batch of the full pass: chunks of per-example gradients, squared into per-parameter sums."""

    def __init__(self, model, task: Task, estimator: Estimator, chunk_size: int, seed: int):
        self.model, self.task, self.estimator, self.chunk_size = model, task, estimator, chunk_size
        self.sampler = LabelSampler(seed)
        self.params = {name: p.detach() for name, p in model.named_parameters()}
        self.buffers = dict(model.named_buffers())
        self.sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params.items()}

        causal = get_architecture(model.config.model_type).causal

        def loss(params, inputs, weights, label):
            return _example_loss(model, task, causal, params, self.buffers, inputs, weights, label)

        self.per_example_grad = vmap(grad(loss), in_dims=(None, 0, 0, 0))

    def __call__(self, batch: Batch) -> None:
        if self.estimator.per_batch:
            self._add_batch_square(batch)
            return
        inputs = model_inputs(batch)  # input_ids, attention_mask and any other model input, each (B, T)
        weights = self._weights(batch)
        if self.estimator == Estimator.EXPECTED:
            with torch.no_grad():
                probs = torch.softmax(self.model(**inputs).logits.float(), dim=-1)  # (B, C)
            for label in range(probs.shape[-1]):
                targets = torch.full((probs.shape[0],), label, dtype=torch.long, device=probs.device)
                self._add_squares(inputs, weights, targets, probs[:, label])
            return
        self._add_squares(inputs, weights, self._labels(batch), None)

    def _weights(self, batch: Batch) -> torch.Tensor:
        """Per-token target weights (B, T-1) for LMs; a placeholder (B,) for classifiers."""
        if self.task == Task.CAUSAL_LM:
            return lm_target_weights(batch)
        return torch.zeros(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def _labels(self, batch: Batch) -> torch.Tensor:
        """Per-example targets: data labels / next tokens, or draws from the model for the sampled estimator."""
        if self.estimator != Estimator.SAMPLED:
            return batch["input_ids"] if self.task == Task.CAUSAL_LM else batch["labels"]
        with torch.no_grad():
            draws = self.sampler(self.model(**model_inputs(batch)).logits)
        if self.task != Task.CAUSAL_LM:
            return draws
        # Position t predicts token t+1: shift the draws right so that label[t+1] is what position t produced.
        return torch.cat([batch["input_ids"][:, :1], draws[:, :-1]], dim=1)

    def _add_squares(self, inputs, weights, labels, scale) -> None:
        for start in range(0, labels.shape[0], self.chunk_size):
            part = slice(start, start + self.chunk_size)
            chunk = {k: v[part] for k, v in inputs.items()}
            grads = self.per_example_grad(self.params, chunk, weights[part], labels[part])
            for name, g in grads.items():  # g: (C, *shape)
                squares = g.float() ** 2
                if scale is not None:
                    squares = squares * scale[part].view(-1, *([1] * (g.ndim - 1)))
                self.sums[name] += squares.sum(dim=0)
            del grads

    def _add_batch_square(self, batch: Batch) -> None:
        """The authors' variant: square the gradient of the batch's mean loss (one ordinary backward pass)."""
        losses = per_example_losses(self.model, batch, self.task)
        names = list(self.params)
        parameters = dict(self.model.named_parameters())
        for name, g in zip(names, torch.autograd.grad(losses.mean(), [parameters[n] for n in names])):
            self.sums[name] += g.float() ** 2


_FULL_TASKS = (Task.CLASSIFICATION, Task.REGRESSION, Task.CAUSAL_LM)


def check_full_supported(config, settings: Optional[CalibrationSettings] = None) -> None:
    """The full pass vectorises one example's loss through functional_call: sequence classifiers and causal LMs of
    single-stack, dense families, on one device. Refuse the rest with a clear error."""
    spec = get_architecture(config.model_type)
    task = task_of(config)
    experts = any(site.kind == Kind.EXPERTS for stack in spec.stacks for site in stack.sites.values())
    if task not in _FULL_TASKS or len(spec.stacks) > 1 or experts:
        raise FisherMaskError(
            f"The full Fisher (--full) supports sequence classifiers and causal LMs of dense single-stack models; this "
            f"is a {spec.name} {task.value} model. Calibrate its mask Fisher (method fisher_mask) instead."
        )
    if settings is not None and settings.device_map:
        raise SettingsError(
            f"The full Fisher needs the whole model on one device (a per-example gradient of every parameter), so "
            f"it does not take {option('device_map')}. Calibrate the mask Fisher with {option('device_map')} "
            f"instead, or drop {option('device_map')}."
        )


def compute_full_fisher(
    model, dataloader, settings: Optional[CalibrationSettings] = None, *, accelerator=None, progress: bool = True,
    **overrides,
) -> Tuple[Dict[str, torch.Tensor], int]:
    """Return ({parameter name: Fisher as float32 CPU tensors}, N); same estimators as the mask pass. The settings'
    ``chunk_size`` examples' gradients are held at once."""
    settings = with_overrides(settings, overrides)
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        raise FisherMaskError(
            "The full Fisher needs the whole model on one device (per-example gradients of every parameter); this "
            "model is spread by a device map. Calibrate the mask Fisher with --device-map, or drop --device-map."
        )
    check_full_supported(model.config)
    context = PassContext.of(model, settings)
    step = _FullStep(model, context.task, settings.estimator, settings.chunk_size, settings.seed)
    sums, count = run_pass(
        model,
        dataloader,
        step,
        lambda: {name: value.cpu() for name, value in step.sums.items()},
        context=context,
        accelerator=accelerator,
        description="Full Fisher",
        progress=progress,
        trainable=settings.estimator.per_batch,  # vmap's grad() differentiates the detached copies instead
    )
    return {name: value.float() for name, value in sums.items()}, count


def measure(run: PreparedCalibration, *, progress: bool = True):
    """The full pass over a prepared run: the fields of its :class:`FullFisher` and N."""
    tensors, count = compute_full_fisher(run.model, run.loader, run.settings, accelerator=run.accelerator,
                                         progress=progress)
    return {"tensors": tensors, "shard_of": shard_map(run.model_dir)}, count


def _float32_bytes(model_dir: Path, config, settings) -> int:
    """A full Fisher stores one float32 per parameter."""
    total = 0
    for _, _, shape, _, _ in iter_tensor_headers(model_dir):
        count = 1
        for size in shape:
            count *= size
        total += 4 * count
    return total


PASS = CalibrationPass(
    record=FullFisher,
    measure=measure,
    description="full Fisher",
    check=check_full_supported,
    # Eager attention is plain matmuls that vmap batches; SDPA has no batching rule on CPU and would be looped.
    model_options={"attn_implementation": "eager"},
    output_bytes=_float32_bytes,
    reads=frozenset({"estimator", "aggregate", "chunk_size"}),
)
