"""Calibration: measure the Fisher information of every mask node over a dataloader, driven by accelerate.

Estimators (``F`` is averaged over the N calibration examples unless noted):

* ``empirical`` (default): ``(1/N) sum_n (dL_n/dm)^2`` at ``m = 1`` with the data's labels, exact per example.
* ``expected``: ``(1/N) sum_n sum_y p(y|x_n) (d log p(y|x_n)/dm)^2``; classifiers only, one backward per class.
* ``sampled``: as ``empirical``, with labels drawn from the model's own predictive distribution.
* ``batch``: ``sum_b (d mean_{n in b} L_n / dm)^2``, squared per batch and summed, as the paper's code does.
  It is about ``1/B^2`` of the per-example value; use it only to reproduce the authors' numbers.

All parameters are frozen, so autograd computes mask gradients only: the cost is about one forward plus one
activation-only backward per batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .architectures import NodeShape, get_architecture
from .errors import CalibrationDataError, FisherMaskError
from .losses import Batch, causal_lm_losses, classification_losses, classifier_logits
from .masks import MaskNodes

LOG = logging.getLogger(__name__)

ESTIMATORS = ("empirical", "expected", "sampled", "batch")
# Saved activations one backward pass may hold (estimated); bigger batches are split into micro-batches.
ACTIVATION_BUDGET_BYTES = 1 << 30
CLASSIFICATION, CAUSAL_LM = "classification", "causal_lm"


@dataclass
class CalibrationSettings:
    """Everything that determines a calibration result besides the model and the data source."""

    samples: int = 256
    batch_size: int = 16
    max_length: int = 256
    estimator: str = "empirical"
    seed: int = 0
    text_columns: Optional[List[str]] = None
    label_column: Optional[str] = None
    mixed_precision: str = "no"
    micro_batch_size: Optional[int] = None  # None: split batches automatically to bound activation memory

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise FisherMaskError(f"Unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise FisherMaskError(f"mixed_precision must be no, bf16 or fp16; got {self.mixed_precision!r}.")
        for name in ("samples", "batch_size", "max_length"):
            if int(getattr(self, name)) < 1:
                raise FisherMaskError(f"{name} must be a positive integer, got {getattr(self, name)}.")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FisherSums:
    """Running sums of squared mask gradients and the number of examples they cover."""

    head: torch.Tensor  # (L, H)
    ffn: torch.Tensor  # (L, D)
    examples: int = 0


def task_of(model) -> str:
    """Which loss a model's head implies; raise a clear error for models without a usable head."""
    architecture = (model.config.architectures or [type(model).__name__])[0]
    if architecture.endswith(("ForSequenceClassification",)):
        return CLASSIFICATION
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    raise FisherMaskError(
        f"Model class {architecture} has no head to compute a loss with. Calibrate a *ForSequenceClassification "
        "(cross-entropy/MSE on labels) or a *ForCausalLM checkpoint (next-token loss)."
    )


def loss_name(model) -> str:
    if task_of(model) == CAUSAL_LM:
        return "causal_lm"
    return "mse" if model.config.num_labels == 1 else "cross_entropy"


def compute_mask_fisher(
    model,
    dataloader,
    *,
    estimator: str = "empirical",
    accelerator=None,
    forward_fn: Optional[Callable[[torch.nn.Module, Batch], torch.Tensor]] = None,
    seed: int = 0,
    progress: bool = True,
    mixed_precision: str = "no",
    micro_batch_size: Optional[int] = None,
    activation_budget_bytes: int = ACTIVATION_BUDGET_BYTES,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Return ``(head_fisher (L, H), ffn_fisher (L, D), N)`` summed over all processes.

    Each batch runs as micro-batches of ``micro_batch_size`` examples (default: as many as fit an estimated
    ``activation_budget_bytes`` of saved activations), each trimmed to its own longest example. The result does
    not depend on the split: per-example estimators sum per example, and ``batch`` sums the micro-batch gradients
    before squaring.

    ``forward_fn(model, batch) -> (B,)`` overrides the per-example loss (empirical and batch estimators).
    ``mixed_precision`` ("bf16"/"fp16") autocasts the forward pass; "no" defers to the accelerator's own setting
    (e.g. ``accelerate launch --mixed_precision bf16``). Masks and sums stay float32/float64.
    The model must already sit on the accelerator's device; its parameters are frozen for the pass and restored.
    """
    if estimator not in ESTIMATORS:
        raise FisherMaskError(f"Unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}.")
    shape = NodeShape.from_config(model.config)
    spec = get_architecture(shape.model_type)
    task = task_of(model)
    if estimator == "expected" and task != CLASSIFICATION:
        raise FisherMaskError(
            "The expected Fisher sums over every possible label; for a causal LM that is the whole vocabulary at "
            "every position. Use --estimator sampled for language models."
        )
    if estimator in ("expected", "sampled") and task == CLASSIFICATION and model.config.num_labels == 1:
        raise FisherMaskError(f"The {estimator} estimator needs a classifier; this model is a regressor (num_labels=1).")
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = FisherSums(
        head=torch.zeros(shape.num_layers, shape.num_heads, device=device, dtype=torch.float64),
        ffn=torch.zeros(shape.num_layers, shape.intermediate_size, device=device, dtype=torch.float64),
    )
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.eval()  # dropout off: the Fisher of the deterministic model
    model.requires_grad_(False)  # no weight gradient is ever computed
    try:
        with MaskNodes(model, spec, shape) as nodes:
            for batch in tqdm(dataloader, desc="Mask Fisher", unit="batch", disable=not show):
                batch_size, length = batch["input_ids"].shape
                micro = micro_batch_size or auto_micro_batch_size(shape, length, activation_budget_bytes)
                totals = [torch.zeros_like(sums.head), torch.zeros_like(sums.ffn)]
                for part in _micro_batches(batch, micro):
                    masks = nodes.new_masks(part["input_ids"].shape[0], device)
                    with autocast_context(mixed_precision, accelerator, device):
                        contribution = _micro_batch_contribution(
                            model, part, masks, task, estimator, forward_fn, generator
                        )
                    for total, value in zip(totals, contribution):
                        total += value.double()
                if estimator == "batch":  # square the gradient of the batch's mean loss
                    totals = [(total / batch_size) ** 2 for total in totals]
                sums.head += totals[0]
                sums.ffn += totals[1]
                sums.examples += batch_size
    finally:
        model.train(was_training)
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    head, ffn, examples = _reduce(sums, accelerator)
    if examples == 0:
        raise CalibrationDataError("The calibration dataloader yielded no examples; check the data source and --samples.")
    if estimator != "batch":
        head, ffn = head / examples, ffn / examples
    return head.float().cpu(), ffn.float().cpu(), examples


def autocast_context(mixed_precision: str, accelerator, device: torch.device):
    # Autocast per call rather than through Accelerator(mixed_precision=...): accelerate's state is a process-wide
    # singleton, so a second calibration with another precision in the same process would be refused.
    if mixed_precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
    if mixed_precision != "no":
        raise FisherMaskError(f"mixed_precision must be no, bf16 or fp16; got {mixed_precision!r}.")
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()


def auto_micro_batch_size(shape: NodeShape, length: int, budget_bytes: int = ACTIVATION_BUDGET_BYTES) -> int:
    """Examples per backward pass so that saved activations stay near ``budget_bytes`` (a rough fp32 estimate)."""
    # Per token and layer, backward keeps roughly six hidden-sized and four FFN-sized fp32 activations.
    per_token = shape.num_layers * (6 * shape.hidden_size + 4 * shape.intermediate_size) * 4
    return max(1, budget_bytes // (per_token * max(length, 1)))


def _micro_batches(batch: Batch, size: int):
    """Split a right-padded batch into micro-batches, each trimmed to its longest example."""
    total = batch["input_ids"].shape[0]
    for start in range(0, total, size):
        part = {key: value[start : start + size] for key, value in batch.items()}
        length = int(part["attention_mask"].sum(dim=1).max())
        yield {key: value[:, :length] if value.dim() == 2 else value for key, value in part.items()}


def _micro_batch_contribution(model, batch, masks, task, estimator, forward_fn, generator) -> Sequence[torch.Tensor]:
    """(L, K) sums over the micro-batch: of squared per-example gradients, or of gradients for ``batch``."""
    if estimator == "expected":
        logits = classifier_logits(model, batch)  # (B, C)
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp().detach()
        out = [torch.zeros_like(m[:, 0]) for m in masks]
        classes = log_probs.shape[-1]
        for c in range(classes):
            grads = torch.autograd.grad(log_probs[:, c].sum(), masks, retain_graph=c < classes - 1)
            for acc, grad in zip(out, grads):
                acc += torch.einsum("b,lbk->lk", probs[:, c], grad.float() ** 2)  # (L, K)
        return out

    losses = _per_example_losses(model, batch, task, estimator, forward_fn, generator)  # (b,)
    grads = torch.autograd.grad(losses.sum(), masks)  # row n of each (L, b, K) gradient is dL_n/dm
    if estimator == "batch":
        return [grad.float().sum(dim=1) for grad in grads]  # (L, K)
    return [(grad.float() ** 2).sum(dim=1) for grad in grads]  # (L, b, K) -> (L, K)


def _per_example_losses(model, batch, task, estimator, forward_fn, generator) -> torch.Tensor:
    if forward_fn is not None:
        if estimator not in ("empirical", "batch"):
            raise FisherMaskError("A custom forward_fn defines its own labels; use the empirical or batch estimator.")
        return forward_fn(model, batch)
    sampled = estimator == "sampled"
    if task == CAUSAL_LM:
        return causal_lm_losses(model, batch, sample_targets=generator if sampled else None)
    logits = classifier_logits(model, batch)  # (B, C)
    if sampled:
        labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=generator).squeeze(1)
    else:
        if "labels" not in batch:
            raise CalibrationDataError("The batch has no labels; the empirical and batch estimators need them.")
        labels = batch["labels"]
    return classification_losses(logits, labels)


def _reduce(sums: FisherSums, accelerator) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Sum the running sums over data-parallel processes (a no-op on one process)."""
    count = torch.tensor([float(sums.examples)], device=sums.head.device, dtype=torch.float64)
    if accelerator is None or accelerator.num_processes == 1:
        return sums.head, sums.ffn, int(count.item())
    head = accelerator.reduce(sums.head, reduction="sum")
    ffn = accelerator.reduce(sums.ffn, reduction="sum")
    count = accelerator.reduce(count, reduction="sum")
    return head, ffn, int(count.item())


def load_calibration_model(model_dir, *, dtype: torch.dtype = torch.float32, attn_implementation: Optional[str] = None):
    """Load a classifier or causal LM with the class its config names (AutoModelFor... by head)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    NodeShape.from_config(config, where=str(model_dir))  # unsupported architectures fail before loading weights
    architecture = (config.architectures or ["?"])[0]
    if architecture.endswith("ForSequenceClassification"):
        auto = AutoModelForSequenceClassification
    elif architecture.endswith(("ForCausalLM", "LMHeadModel")):
        auto = AutoModelForCausalLM
    else:
        raise FisherMaskError(
            f"{model_dir}: model class {architecture} has no head to compute a loss with. Calibrate a "
            "*ForSequenceClassification or *ForCausalLM checkpoint."
        )
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return auto.from_pretrained(model_dir, dtype=dtype, **extra)


@dataclass
class _Prepared:
    model_dir: object
    net: torch.nn.Module
    loader: object
    description: dict
    accelerator: object


def prepare_calibration(
    model: str, data: str, settings: CalibrationSettings, accelerator=None, **load_options
) -> _Prepared:
    """Resolve and load the model, select and tokenize the data, and shard it over processes (for custom passes)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from transformers import AutoTokenizer

    from .data import CalibrationDataset, encode_labels, prepare_tokenizer, select_examples
    from .fingerprint import resolve_model_dir

    if accelerator is None:
        # Launched as several processes on a machine without GPUs, accelerate only picks CPU data parallelism
        # (gloo) when told cpu=True; otherwise each process would silently calibrate on everything.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        # even_batches=False: padding the last batch with repeated examples would count them twice.
        accelerator = Accelerator(cpu=multi_cpu, dataloader_config=DataLoaderConfiguration(even_batches=False))
    model_dir = resolve_model_dir(model)
    net = load_calibration_model(model_dir, **load_options)
    task = task_of(net)
    needs_labels = task == CLASSIFICATION and settings.estimator in ("empirical", "batch")
    examples = select_examples(
        data,
        samples=settings.samples,
        seed=settings.seed,
        text_columns=settings.text_columns,
        label_column=settings.label_column,
        needs_labels=needs_labels,
    )
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    labels = encode_labels(examples.labels, net.config, source=data) if examples.labels is not None else None
    dataset = CalibrationDataset(examples, tokenizer, max_length=settings.max_length, labels=labels)
    if task == CAUSAL_LM:
        dataset.drop_short(minimum_tokens=2, source=data)  # one token has no next-token target
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=settings.batch_size, shuffle=False, collate_fn=dataset.collate
    )
    net.to(accelerator.device)
    description = {**examples.description, "settings": settings.as_dict(), "processes": accelerator.num_processes}
    return _Prepared(model_dir, net, accelerator.prepare_data_loader(loader), description, accelerator)


def calibrate(
    model: str,
    data: str,
    out,
    settings: Optional[CalibrationSettings] = None,
    *,
    accelerator=None,
    progress: bool = True,
):
    """Measure mask Fisher of ``model`` (folder or Hub id) on ``data`` and write it to ``out``; return the MaskFisher.

    Runs under any ``accelerate launch`` configuration; only the main process writes the file.
    """
    from .fingerprint import model_fingerprint
    from .fisher_file import MaskFisher, save_mask_fisher

    settings = settings or CalibrationSettings()
    run = prepare_calibration(model, data, settings, accelerator)
    head, ffn, count = compute_mask_fisher(
        run.net,
        run.loader,
        estimator=settings.estimator,
        accelerator=run.accelerator,
        seed=settings.seed,
        progress=progress,
        mixed_precision=settings.mixed_precision,
        micro_batch_size=settings.micro_batch_size,
    )
    fisher = MaskFisher(
        head=head,
        ffn=ffn,
        shape=NodeShape.from_config(run.net.config),
        fingerprint=model_fingerprint(run.model_dir),
        samples=count,
        estimator=settings.estimator,
        loss=loss_name(run.net),
        model=str(model),
        data=run.description,
    )
    if run.accelerator.is_main_process:
        save_mask_fisher(fisher, out)
    run.accelerator.wait_for_everyone()
    return fisher


def calibrate_full(
    model: str,
    data: str,
    out,
    settings: Optional[CalibrationSettings] = None,
    *,
    chunk_size: int = 8,
    accelerator=None,
    progress: bool = True,
):
    """Measure the full diagonal Fisher of every parameter and write it as a sharded folder ``out``.

    Returns ``(fisher dict, samples)``. ``chunk_size`` examples' gradients are held at once.
    """
    import json

    from .fingerprint import model_fingerprint
    from .full_fisher import compute_full_fisher, save_full_fisher

    settings = settings or CalibrationSettings()
    # Eager attention is plain matmuls that vmap batches; SDPA has no batching rule on CPU and would be looped.
    run = prepare_calibration(model, data, settings, accelerator, attn_implementation="eager")
    fisher, count = compute_full_fisher(
        run.net,
        run.loader,
        estimator=settings.estimator,
        accelerator=run.accelerator,
        chunk_size=chunk_size,
        seed=settings.seed,
        progress=progress,
        mixed_precision=settings.mixed_precision,
    )
    metadata = {
        "model_type": run.net.config.model_type,
        "fingerprint": model_fingerprint(run.model_dir),
        "model": str(model),
        "samples": str(count),
        "estimator": settings.estimator,
        "loss": loss_name(run.net),
        "data": json.dumps(run.description, sort_keys=True),
    }
    if run.accelerator.is_main_process:
        save_full_fisher(fisher, run.model_dir, out, metadata)
    run.accelerator.wait_for_everyone()
    return fisher, count
