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
    TOKEN_CROSS_ENTROPY = "token_cross_entropy"  # mean over an example's labelled tokens
    SPAN = "span"  # question answering: mean of the start and end cross-entropies
    SEQ2SEQ = "seq2seq"  # mean over an example's target tokens


class Task(str, enum.Enum):
    CLASSIFICATION = "classification"  # sequence classifier with num_labels > 1
    REGRESSION = "regression"  # sequence classifier with num_labels == 1
    CAUSAL_LM = "causal_lm"
    TOKEN_CLASSIFICATION = "token_classification"  # one label per word (NER)
    QUESTION_ANSWERING = "question_answering"  # extractive: start and end of the answer span
    SEQ2SEQ = "seq2seq"  # encoder-decoder generation (T5)

    @property
    def loss(self) -> Loss:
        return _LOSSES[self]

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads this head."""
        return _AUTO_CLASSES[self]

    @property
    def pipeline_tag(self) -> str:
        """The Hugging Face Hub's ``pipeline_tag`` for a model with this head."""
        return _PIPELINE_TAGS[self]


_LOSSES = {
    Task.CLASSIFICATION: Loss.CROSS_ENTROPY,
    Task.REGRESSION: Loss.MSE,
    Task.CAUSAL_LM: Loss.CAUSAL_LM,
    Task.TOKEN_CLASSIFICATION: Loss.TOKEN_CROSS_ENTROPY,
    Task.QUESTION_ANSWERING: Loss.SPAN,
    Task.SEQ2SEQ: Loss.SEQ2SEQ,
}
_AUTO_CLASSES = {
    Task.CLASSIFICATION: "AutoModelForSequenceClassification",
    Task.REGRESSION: "AutoModelForSequenceClassification",
    Task.CAUSAL_LM: "AutoModelForCausalLM",
    Task.TOKEN_CLASSIFICATION: "AutoModelForTokenClassification",
    Task.QUESTION_ANSWERING: "AutoModelForQuestionAnswering",
    Task.SEQ2SEQ: "AutoModelForSeq2SeqLM",
}
_PIPELINE_TAGS = {
    Task.CLASSIFICATION: "text-classification",
    Task.REGRESSION: "text-classification",
    Task.CAUSAL_LM: "text-generation",
    Task.TOKEN_CLASSIFICATION: "token-classification",
    Task.QUESTION_ANSWERING: "question-answering",
    Task.SEQ2SEQ: "text2text-generation",
}
# Architecture class-name suffix -> the task of that head (the first matching suffix wins).
_HEAD_SUFFIXES: Tuple[Tuple[str, Task], ...] = (
    ("ForSequenceClassification", Task.CLASSIFICATION),
    ("ForCausalLM", Task.CAUSAL_LM),
    ("LMHeadModel", Task.CAUSAL_LM),
    ("ForTokenClassification", Task.TOKEN_CLASSIFICATION),
    ("ForQuestionAnswering", Task.QUESTION_ANSWERING),
    ("ForConditionalGeneration", Task.SEQ2SEQ),
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
