"""What the mask pass and the full pass share: the estimator check, the frozen model, the loop and the reduce.

A pass supplies a ``step(batch)`` that adds one batch's contribution to its own running sums, and a
``collect()`` that returns those sums as a dict of CPU tensors; :func:`run_pass` does everything else.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Tuple

import torch
from tqdm.auto import tqdm

from ..errors import CalibrationDataError, FisherMaskError
from ..settings import Estimator, MixedPrecision
from ..tasks import Task
from .losses import Batch

_COUNT = "__examples__"  # the example count travels with the sums through one reduce


def check_estimator(estimator: Estimator, task: Task) -> None:
    """Refuse an estimator that has no meaning for the model's task, before any work."""
    if task == Task.REGRESSION and not estimator.uses_labels:
        raise FisherMaskError(
            f"The {estimator.value} estimator uses a classifier's predicted distribution over labels (drawing from it, "
            "or summing over it); this model is a regressor (num_labels=1). Use --estimator empirical or batch."
        )
    if task == Task.QUESTION_ANSWERING and not estimator.uses_labels:
        raise FisherMaskError(
            f"The {estimator.value} estimator is not implemented for question answering (a distribution over every "
            "start and end position). Use --estimator empirical or batch."
        )
    if estimator == Estimator.EXPECTED and task == Task.TOKEN_CLASSIFICATION:
        raise FisherMaskError(
            "The expected Fisher of a token classifier needs one backward pass per token and label. Use --estimator "
            "sampled, which draws each token's label from the model and estimates the same Fisher without bias."
        )
    if estimator == Estimator.EXPECTED and task != Task.CLASSIFICATION:
        raise FisherMaskError(
            "The expected Fisher sums over every possible label; for a language model that is the whole vocabulary "
            "at every position. Use --estimator sampled for language models."
        )


@contextlib.contextmanager
def frozen(model: torch.nn.Module, *, trainable: bool = False):
    """Evaluation mode (the Fisher of the deterministic model), parameter gradients off (or on, if ``trainable``)
    and no KV cache (calibration never generates, and a layer recomputed under activation checkpointing would
    append to the cache twice). The model's mode, flags and ``config.use_cache`` are restored on exit."""
    was_training = model.training
    flags = [parameter.requires_grad for parameter in model.parameters()]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    model.requires_grad_(trainable)
    if use_cache is not None:
        config.use_cache = False
    try:
        yield model
    finally:
        model.train(was_training)
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        if use_cache is not None:
            config.use_cache = use_cache


def autocast_context(mixed_precision, accelerator, device: torch.device):
    """Autocast for ``bf16``/``fp16``; for ``no``, the accelerator's own setting (``accelerate launch --mixed_precision``).

    Autocast is applied per call rather than through ``Accelerator(mixed_precision=...)``: accelerate's state is a
    process-wide singleton, so a second calibration with another precision in the same process would be refused.
    """
    mixed_precision = MixedPrecision(mixed_precision)
    if mixed_precision != MixedPrecision.NO:
        dtype = torch.bfloat16 if mixed_precision == MixedPrecision.BF16 else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()


def reduce_sums(sums: Dict[str, torch.Tensor], examples: int, accelerator) -> Tuple[Dict[str, torch.Tensor], int]:
    """Sum CPU running sums and the example count over data-parallel processes (a no-op on one process)."""
    sums = {**sums, _COUNT: torch.tensor([float(examples)], dtype=torch.float64)}
    if accelerator is not None and accelerator.num_processes > 1:
        on_device = {name: value.to(accelerator.device) for name, value in sums.items()}
        sums = {name: value.cpu() for name, value in accelerator.reduce(on_device, reduction="sum").items()}
    count = int(sums.pop(_COUNT).item())
    return sums, count


def run_pass(
    model: torch.nn.Module,
    dataloader: Iterable[Batch],
    step: Callable[[Batch], None],
    collect: Callable[[], Dict[str, torch.Tensor]],
    *,
    estimator: Estimator,
    accelerator,
    device: torch.device,
    description: str,
    progress: bool = True,
    mixed_precision=MixedPrecision.NO,
    trainable: bool = False,
) -> Tuple[Dict[str, torch.Tensor], int]:
    """Run ``step`` over every batch of a frozen model and return the reduced sums, averaged over the N examples.

    Each batch is moved to ``device`` (the model's input device) and run under the mixed-precision setting.
    The ``batch`` estimator's sums are returned as they are (squared per batch and summed, as the authors do).
    """
    show = progress and (accelerator is None or accelerator.is_main_process)
    examples = 0
    with frozen(model, trainable=trainable):
        for batch in tqdm(dataloader, desc=description, unit="batch", disable=not show):
            batch = {key: value.to(device) for key, value in batch.items()}  # a no-op when already there
            with autocast_context(mixed_precision, accelerator, device):
                step(batch)
            examples += batch["input_ids"].shape[0]
    sums, count = reduce_sums(collect(), examples, accelerator)
    if count == 0:
        raise CalibrationDataError("The calibration dataloader yielded no examples; check the data source and --samples.")
    if estimator != Estimator.BATCH:
        sums = {name: value / count for name, value in sums.items()}
    return sums, count
