"""What a checkpoint's head computes, and so which loss calibration uses: read from its config, as data."""

from __future__ import annotations

import enum
from typing import Tuple

from .errors import FisherMaskError


class Loss(str, enum.Enum):
    """The per-example loss whose mask gradients are squared; recorded in every Fisher file."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    CAUSAL_LM = "causal_lm"


class Task(str, enum.Enum):
    CLASSIFICATION = "classification"  # sequence classifier with num_labels > 1
    REGRESSION = "regression"  # sequence classifier with num_labels == 1
    CAUSAL_LM = "causal_lm"

    @property
    def loss(self) -> Loss:
        return {Task.CLASSIFICATION: Loss.CROSS_ENTROPY, Task.REGRESSION: Loss.MSE, Task.CAUSAL_LM: Loss.CAUSAL_LM}[self]

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads this head."""
        if self == Task.CAUSAL_LM:
            return "AutoModelForCausalLM"
        return "AutoModelForSequenceClassification"


# Architecture class-name suffix -> the task of that head (the first matching suffix wins).
_HEAD_SUFFIXES: Tuple[Tuple[str, Task], ...] = (
    ("ForSequenceClassification", Task.CLASSIFICATION),
    ("ForCausalLM", Task.CAUSAL_LM),
    ("LMHeadModel", Task.CAUSAL_LM),
)


def task_of(config, *, where: str = "model") -> Task:
    """The task of a checkpoint, from ``config.architectures[0]``; a clear error for heads without a loss."""
    architecture = (config.architectures or ["(none)"])[0]
    for suffix, task in _HEAD_SUFFIXES:
        if architecture.endswith(suffix):
            if task == Task.CLASSIFICATION and config.num_labels == 1:
                return Task.REGRESSION
            return task
    supported = ", ".join(f"*{suffix}" for suffix, _ in _HEAD_SUFFIXES)
    raise FisherMaskError(
        f"{where}: model class {architecture} has no head to compute a loss with. Calibrate a checkpoint with a "
        f"task head ({supported}); a bare encoder needs its fine-tuned head."
    )
