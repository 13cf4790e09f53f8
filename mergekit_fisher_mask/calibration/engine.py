"""What every calibration pass shares: its settings and preamble, the frozen model, the loop and the one reduce.

A pass supplies a ``step(batch)`` that adds one batch's contribution to its own running sums, and a ``collect()``
that returns those sums as a dict of CPU tensors; :func:`run_pass` does everything else. A pass for the
command line and the Python API is a :class:`CalibrationPass`: the file format it writes and how it measures a
prepared run (see :mod:`.api`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, FrozenSet, Iterable, Optional, Protocol, Tuple

import torch
from tqdm.auto import tqdm

from ..architectures import ArchitectureSpec, NodeShape, get_architecture
from ..errors import CalibrationDataError
from ..settings import CalibrationSettings, MixedPrecision, check_estimator, make_settings
from ..tasks import Task, task_of
from .losses import Batch, model_inputs
from .placement import Placement

_COUNT = "__examples__"  # the example count travels with the sums through one reduce
_RIDER = "rider/"  # a rider's sums travel with the pass's own through the same reduce


def with_overrides(settings: Optional[CalibrationSettings], overrides: Dict[str, Any]) -> CalibrationSettings:
    """``settings`` (default: the defaults) with keyword overrides, validated as one settings object."""
    settings = settings or CalibrationSettings()
    if not overrides:
        return settings
    return make_settings({**settings.model_dump(exclude_unset=True), **overrides}, "calibration settings")


@dataclass(frozen=True)
class PassContext:
    """What a pass reads off the model and its settings before the first batch (the preamble every pass shares)."""

    settings: CalibrationSettings
    task: Task
    spec: ArchitectureSpec
    shape: NodeShape
    placement: Placement

    @classmethod
    def of(cls, model: torch.nn.Module, settings: CalibrationSettings, *, check: bool = True) -> "PassContext":
        """Refuse an estimator the model's task does not support, and read the model's layout and placement."""
        task = task_of(model.config)
        if check:
            check_estimator(settings.estimator, task)
        shape = NodeShape.from_config(model.config)
        return cls(settings, task, get_architecture(shape.model_type), shape, Placement.of(model))


@dataclass
class PreparedCalibration:
    """A loaded model and its sharded, tokenized calibration data, ready for a pass (see ``prepare_calibration``).

    Use it as a context manager (or call :meth:`cleanup`): this run's own offload folder is removed at the end.
    """

    model_dir: Path
    model: torch.nn.Module
    loader: Any
    description: Dict[str, Any]
    accelerator: Any
    settings: CalibrationSettings
    task: Task
    _resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def cleanup(self) -> None:
        self._resources.close()

    def __enter__(self) -> "PreparedCalibration":
        return self

    def __exit__(self, *_exc_info) -> None:
        self.cleanup()

    def inputs(self, batch: Batch) -> Batch:
        """A batch of the loader as the model's forward takes it: model inputs only, on the model's input device."""
        device = Placement.of(self.model).input_device
        return {key: value.to(device) for key, value in model_inputs(batch).items()}


LOSS_COLUMNS = frozenset({"label_column", "target_column"})


@dataclass(frozen=True)
class CalibrationPass:
    """One statistic the ``calibrate`` command can measure: the record type (file format) it writes, how it measures
    a prepared run (``measure(run, progress=...) -> (record fields, N)``), refusals that need only the config and
    settings, how the model is loaded for it, and the expected size of its output (for the free-space check)."""

    record: type
    measure: Callable[..., Tuple[Dict[str, Any], int]]
    description: str
    check: Callable[[Any, CalibrationSettings], None] = lambda config, settings: None
    model_options: Dict[str, Any] = field(default_factory=dict)
    output_bytes: Callable[[Path, Any, CalibrationSettings], Optional[int]] = lambda model_dir, config, settings: None
    uses_loss: bool = True  # False for a forward-only statistic: no estimator, no loss
    reads: FrozenSet[str] = frozenset()  # the pass-specific settings (settings.py's _PASS_SPECIFIC) it reads

    @property
    def settings_read(self) -> FrozenSet[str]:
        """``reads``, plus the data columns only a loss needs (labels, seq2seq targets) for a pass with a loss."""
        return self.reads | (LOSS_COLUMNS if self.uses_loss else frozenset())


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


class Rider(Protocol):
    """A forward-only statistic measured in the forward passes of another pass (RegMean's Grams in the mask pass).

    The pass wraps each forward whose inputs count in ``observing(batch)`` (never an activation-checkpointing
    recompute during backward); ``collect()`` returns the rider's running sums on the CPU, and ``receive(sums)``
    takes them back summed over processes (never averaged)."""

    def observing(self, batch: Batch) -> ContextManager[None]: ...

    def collect(self) -> Dict[str, torch.Tensor]: ...

    def receive(self, sums: Dict[str, torch.Tensor]) -> None: ...


def run_pass(
    model: torch.nn.Module,
    dataloader: Iterable[Batch],
    step: Callable[[Batch], None],
    collect: Callable[[], Dict[str, torch.Tensor]],
    *,
    context: PassContext,
    accelerator,
    description: str,
    progress: bool = True,
    trainable: bool = False,
    average: bool = True,
    rider: Optional[Rider] = None,
) -> Tuple[Dict[str, torch.Tensor], int]:
    """Run ``step`` over every batch of a frozen model and return the reduced sums and the example count N.

    Each batch is moved to the model's input device and run under the settings' mixed precision. Sums are averaged
    over the N examples when ``average`` and the estimator squares per example; the ``batch`` estimator's sums are
    returned as they are (squared per batch and summed, as the authors do). A ``rider`` (which ``step`` lets observe
    its forwards) has its sums reduced in the same reduce and handed to it as they are.
    """
    show = progress and (accelerator is None or accelerator.is_main_process)
    device = context.placement.input_device
    examples = 0
    with frozen(model, trainable=trainable):
        for batch in tqdm(dataloader, desc=description, unit="batch", disable=not show):
            batch = {key: value.to(device) for key, value in batch.items()}  # a no-op when already there
            with autocast_context(context.settings.mixed_precision, accelerator, device):
                step(batch)
            examples += batch["input_ids"].shape[0]
    riding = rider.collect() if rider is not None else {}
    sums, count = reduce_sums({**collect(), **{_RIDER + name: value for name, value in riding.items()}}, examples,
                              accelerator)
    if rider is not None:
        rider.receive({name: sums.pop(_RIDER + name) for name in riding})
    if count == 0:
        raise CalibrationDataError("The calibration dataloader yielded no examples; check the data source and --samples.")
    if average and not context.settings.estimator.per_batch:
        sums = {name: value / count for name, value in sums.items()}
    return sums, count
