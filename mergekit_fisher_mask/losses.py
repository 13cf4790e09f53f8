"""Per-example losses, chosen from the model's head: cross-entropy / MSE for classifiers, next-token loss for LMs.

Every function returns a ``(B,)`` tensor whose entry ``n`` depends only on example ``n``; that is what makes one
backward pass of their sum yield each example's own mask gradient.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Batch = Dict[str, torch.Tensor]

# Bytes of fp32 logits one LM-loss chunk may hold. Logits of a whole batch, (B, T, vocab), and their gradient
# would dominate calibration memory for large vocabularies (32 x 128 x 49152 x 4 B = 805 MB each).
LM_CHUNK_BYTES = 64 * 2**20


def model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k not in ("labels", "index")}


def classifier_logits(model, batch: Batch) -> torch.Tensor:
    return model(**model_inputs(batch)).logits.float()  # (B, C)


def classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, or squared error when the head is a regressor (one output)."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def lm_target_weights(attention_mask: torch.Tensor) -> torch.Tensor:
    """Weights (B, T-1) of next-token targets: 1/count over targets whose position and predecessor are real tokens."""
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).float()  # (B, T-1)
    counts = valid.sum(dim=1, keepdim=True)
    if (counts == 0).any():
        short = (counts.squeeze(1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"examples at batch rows {short} have fewer than two tokens, so no next-token target")
    return valid / counts


def causal_lm_losses(
    model,
    batch: Batch,
    *,
    sample_targets: Optional[torch.Generator] = None,
    chunk_bytes: int = LM_CHUNK_BYTES,
) -> torch.Tensor:
    """Mean next-token cross-entropy of each example, computed over sequence chunks to bound logits memory.

    At most one chunk of ``(B, t, vocab)`` logits is alive at a time. With a frozen LM head (calibration), each
    chunk's loss and its gradient with respect to the hidden states are computed together in the forward pass
    (:class:`_FusedHeadLoss`), so backward never recomputes logits; otherwise chunks are checkpointed. With
    ``sample_targets`` the targets are drawn from the model's own predictive distribution (the "sampled" Fisher).
    """
    hidden = model.base_model(**model_inputs(batch)).last_hidden_state[:, :-1]  # (B, T-1, d): predicts t+1
    head = model.get_output_embeddings()
    weights = lm_target_weights(batch["attention_mask"])  # (B, T-1)
    targets = batch["input_ids"][:, 1:]  # (B, T-1)
    chunk = max(1, chunk_bytes // (4 * targets.shape[0] * head.out_features))
    if not any(p.requires_grad for p in head.parameters()):
        return _FusedHeadLoss.apply(hidden, head, targets, weights, chunk, sample_targets)
    total = hidden.new_zeros(targets.shape[0], dtype=torch.float32)
    for start in range(0, targets.shape[1], chunk):
        h = hidden[:, start : start + chunk]  # (B, t, d)
        t = targets[:, start : start + chunk]
        if sample_targets is not None:
            t = _sample(head(h).detach(), sample_targets)
        total = total + checkpoint(_chunk_loss, head, h, t, weights[:, start : start + chunk], use_reentrant=False)
    return total


def _sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)  # (B, t, V)
    return torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])


def _chunk_loss(head, h: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (B, t, V)
    token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B * t,)
    return (token_loss.view_as(weights) * weights).sum(dim=1)  # (B,)


class _FusedHeadLoss(torch.autograd.Function):
    """Per-example LM loss through a frozen head; forward also computes each example's d loss / d hidden.

    Example n's loss depends only on its own hidden states, so the backward of any combination of the losses is
    ``grad_output[n] * d loss_n / d hidden_n``: one extra (B, T, d) tensor instead of recomputed logits.
    """

    @staticmethod
    def forward(ctx, hidden, head, targets, weights, chunk, generator):
        losses = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)  # (B, T-1, d)
        weight = head.weight  # (V, d)
        for start in range(0, hidden.shape[1], chunk):
            h = hidden[:, start : start + chunk]  # (B, t, d)
            logits = head(h).float()  # (B, t, V)
            t = targets[:, start : start + chunk] if generator is None else _sample(logits, generator)
            w = weights[:, start : start + chunk]  # (B, t)
            log_probs = torch.log_softmax(logits, dim=-1)
            losses -= (log_probs.gather(-1, t.unsqueeze(-1)).squeeze(-1) * w).sum(dim=1)
            # d(-log p_t)/d logits = softmax - onehot(t), weighted per token; reuse the buffer in place.
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(-1, t.unsqueeze(-1), -torch.ones_like(w).unsqueeze(-1))
            grad_logits.mul_(w.unsqueeze(-1))
            grad_hidden[:, start : start + chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits, log_probs, grad_logits
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype)[:, None, None], None, None, None, None, None


LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
