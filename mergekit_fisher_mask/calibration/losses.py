"""Per-example losses, chosen from the model's head: cross-entropy / MSE for classifiers, next-token loss for LMs.

Every function returns a ``(B,)`` tensor whose entry ``n`` depends only on example ``n``; that is what makes one
backward pass of their sum yield each example's own mask gradient.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..architectures import get_architecture
from ..errors import CalibrationDataError
from ..tasks import Task

Batch = Dict[str, torch.Tensor]

# Bytes of fp32 logits one LM-loss chunk may hold. Logits of a whole batch, (B, T, vocab), and their gradient
# would dominate calibration memory for large vocabularies (32 x 128 x 49152 x 4 B = 805 MB each).
LM_CHUNK_BYTES = 64 * 2**20
IGNORE = -100  # a target that takes no loss (padding, later sub-tokens of a word), as in transformers
TARGETS = "target_ids"  # a sequence-to-sequence batch's decoder targets
# Batch keys that are not model inputs.
NON_INPUTS = ("labels", "loss_mask", "start_positions", "end_positions", TARGETS)


class LabelSampler:
    """Draws labels from a model's own predictive distribution (the ``sampled`` estimator), reproducibly per seed.

    One generator per device, so that sampling happens where the logits are.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._generators: Dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., C) logits -> (...) sampled class ids."""
        generator = self._generators.get(logits.device)
        if generator is None:
            generator = self._generators[logits.device] = torch.Generator(device=logits.device).manual_seed(self.seed)
        probs = torch.softmax(logits.detach().float(), dim=-1)
        return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])


def model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k not in NON_INPUTS}


def classifier_logits(model, batch: Batch) -> torch.Tensor:
    return model(**model_inputs(batch)).logits.float()  # (B, C)


def classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, or squared error when the head is a regressor (one output)."""
    labels = labels.to(logits.device)
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def per_example_losses(
    model, batch: Batch, task: Task, sampler: Optional["LabelSampler"] = None, *, lm_chunk_bytes: Optional[int] = None
) -> torch.Tensor:
    """(B,) losses of the model's own head; with ``sampler``, against labels drawn from the model itself. A causal
    LM's loss is computed over chunks of at most ``lm_chunk_bytes`` of logits (default: 64 MiB)."""
    if task == Task.CAUSAL_LM:
        return causal_lm_losses(model, batch, sampler=sampler, chunk_bytes=lm_chunk_bytes or LM_CHUNK_BYTES)
    if task == Task.TOKEN_CLASSIFICATION:
        logits = model(**model_inputs(batch)).logits.float()  # (B, T, C)
        return _mean_token_losses(logits, batch["labels"], sampler)
    if task == Task.QUESTION_ANSWERING:
        return span_losses(model, batch)
    if task == Task.SEQ2SEQ:
        targets = batch[TARGETS]  # (B, T')
        decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels=targets)  # shifted right
        logits = model(**model_inputs(batch), decoder_input_ids=decoder_inputs).logits.float()  # (B, T', V)
        return _mean_token_losses(logits, targets, sampler)
    logits = classifier_logits(model, batch)  # (B, C)
    if sampler is None and "labels" not in batch:
        raise CalibrationDataError("The batch has no labels; the empirical and batch estimators need them.")
    return classification_losses(logits, batch["labels"] if sampler is None else sampler(logits))


LogitTransform = Optional[Tuple[str, float]]


def logit_transform(config) -> LogitTransform:
    """The family's transform of LM logits before the loss (Gemma 2's soft-capping, Granite's scaling), if any."""
    spec = get_architecture(config.model_type)
    if spec.logits is None or getattr(config, spec.logits[1], None) is None:
        return None
    return spec.logits[0], float(getattr(config, spec.logits[1]))


def _transform(logits: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    if transform is None:
        return logits
    kind, value = transform
    return torch.tanh(logits / value) * value if kind == "softcap" else logits / value


def _transform_slope(transformed: torch.Tensor, transform: LogitTransform):
    """d transformed / d raw logits, from the transformed logits."""
    kind, value = transform
    return 1 - (transformed / value) ** 2 if kind == "softcap" else 1 / value


def _mean_token_losses(logits: torch.Tensor, targets: torch.Tensor, sampler: Optional["LabelSampler"]) -> torch.Tensor:
    """Mean cross-entropy over each example's scored tokens (targets other than IGNORE); (B, T, C) -> (B,).

    With ``sampler``, each scored token's target is drawn from the model's own distribution at that token.
    """
    targets = targets.to(logits.device)
    scored = targets != IGNORE  # (B, T)
    if sampler is not None:
        targets = torch.where(scored, sampler(logits), targets)
    counts = scored.sum(dim=1)
    if (counts == 0).any():
        rows = (counts == 0).nonzero().flatten().tolist()
        raise CalibrationDataError(f"examples at batch rows {rows} have no labelled token to take the loss on.")
    token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return token_loss.view(targets.shape).sum(dim=1) / counts


def span_losses(model, batch: Batch) -> torch.Tensor:
    """Extractive QA: mean of the start and end cross-entropies of each example, over its real tokens only (so
    padding never changes an example's loss)."""
    out = model(**model_inputs(batch))
    losses = []
    for logits, key in ((out.start_logits, "start_positions"), (out.end_logits, "end_positions")):
        padding = batch["attention_mask"].to(logits.device) == 0
        logits = logits.float().masked_fill(padding, float("-inf"))  # (B, T)
        losses.append(F.cross_entropy(logits, batch[key].to(logits.device), reduction="none"))
    return (losses[0] + losses[1]) / 2


def lm_target_weights(batch: Batch) -> torch.Tensor:
    """Weights (B, T-1) of next-token targets: 1/count over the targets each example's loss averages.

    A target counts if it and the token before it are real (``attention_mask``), and, where the batch has a
    ``loss_mask`` (chat and completion data), if the target is a token the loss is taken on.
    """
    attention = batch["attention_mask"]
    valid = (attention[:, 1:] * attention[:, :-1]).float()  # (B, T-1)
    if "loss_mask" in batch:
        valid = valid * batch["loss_mask"][:, 1:].to(valid.dtype)
    counts = valid.sum(dim=1, keepdim=True)
    if (counts == 0).any():
        short = (counts.squeeze(1) == 0).nonzero().flatten().tolist()
        raise CalibrationDataError(
            f"examples at batch rows {short} have no next-token target to take the loss on (fewer than two tokens, "
            "or no completion/assistant token left after truncation; raise --max-length)."
        )
    return valid / counts


def causal_lm_losses(
    model, batch: Batch, *, sampler: Optional[LabelSampler] = None, chunk_bytes: int = LM_CHUNK_BYTES
) -> torch.Tensor:
    """Mean next-token cross-entropy of each example, computed over sequence chunks to bound logits memory.

    At most one chunk of ``(B, t, vocab)`` logits is alive at a time. With a frozen LM head whose weight is in
    memory (calibration), each chunk's loss and its gradient with respect to the hidden states are computed together
    in the forward pass (:class:`_FusedHeadLoss`), so backward never recomputes logits; otherwise (a trainable or
    offloaded head) chunks are checkpointed. With ``sampler`` the targets are drawn from the model itself.
    """
    hidden = model.base_model(**model_inputs(batch)).last_hidden_state[:, :-1]  # (B, T-1, d): predicts t+1
    head = model.get_output_embeddings()
    transform = logit_transform(model.config)
    weights = lm_target_weights(batch).to(hidden.device)  # (B, T-1)
    targets = batch["input_ids"][:, 1:].to(hidden.device)  # (B, T-1)
    chunk = max(1, chunk_bytes // (4 * targets.shape[0] * head.out_features))
    frozen = not any(p.requires_grad for p in head.parameters())
    if frozen and head.weight.device.type != "meta":
        return _FusedHeadLoss.apply(hidden, head, targets, weights, chunk, sampler, transform)
    total = None
    for start in range(0, targets.shape[1], chunk):
        h = hidden[:, start : start + chunk]  # (B, t, d)
        t = targets[:, start : start + chunk]
        if sampler is not None:
            with torch.no_grad():
                t = sampler(_transform(head(h), transform))
        part = checkpoint(_chunk_loss, head, h, t, weights[:, start : start + chunk], transform, use_reentrant=False)
        total = part if total is None else total + part.to(total.device)
    return total


def _chunk_loss(head, h: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, transform) -> torch.Tensor:
    logits = _transform(head(h).float(), transform)  # (B, t, V), on the head's execution device
    token_loss = F.cross_entropy(logits.flatten(0, 1), targets.to(logits.device).flatten(), reduction="none")
    return (token_loss.view_as(weights) * weights.to(logits.device)).sum(dim=1)  # (B,)


class _FusedHeadLoss(torch.autograd.Function):
    """Per-example LM loss through a frozen head; forward also computes each example's d loss / d hidden.

    Example n's loss depends only on its own hidden states, so the backward of any combination of the losses is
    ``grad_output[n] * d loss_n / d hidden_n``: one extra (B, T, d) tensor instead of recomputed logits.
    """

    @staticmethod
    def forward(ctx, hidden, head, targets, weights, chunk, sampler, transform):
        weight = head.weight  # (V, d)
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=weight.device)
        grad_hidden = torch.empty_like(hidden)  # (B, T-1, d)
        for start in range(0, hidden.shape[1], chunk):
            h = hidden[:, start : start + chunk].to(weight.device)  # (B, t, d)
            logits = _transform(head(h).float(), transform)  # (B, t, V)
            t = targets[:, start : start + chunk].to(weight.device) if sampler is None else sampler(logits)
            w = weights[:, start : start + chunk].to(weight.device)  # (B, t)
            log_probs = torch.log_softmax(logits, dim=-1)
            losses -= (log_probs.gather(-1, t.unsqueeze(-1)).squeeze(-1) * w).sum(dim=1)
            # d(-log p_t)/d logits = softmax - onehot(t), weighted per token; reuse the buffer in place.
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(-1, t.unsqueeze(-1), -torch.ones_like(w).unsqueeze(-1))
            grad_logits.mul_(w.unsqueeze(-1))
            if transform is not None:  # chain rule through the transform, back to the head's raw outputs
                grad_logits.mul_(_transform_slope(logits, transform))
            grad_hidden[:, start : start + chunk] = (grad_logits.to(weight.dtype) @ weight).to(grad_hidden)
            del logits, log_probs, grad_logits
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        scale = grad_output.to(device=grad_hidden.device, dtype=grad_hidden.dtype)[:, None, None]
        return grad_hidden * scale, None, None, None, None, None, None
