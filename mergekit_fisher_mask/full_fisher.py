"""Full diagonal Fisher (Matena & Raffel 2021): one value per parameter, the baseline mask Fisher is compared with.

Per-example gradients come from ``torch.func``: ``vmap(grad(loss))`` over a chunk of examples, so a chunk costs
one vectorised backward instead of a Python loop over examples. Only running sums of squares are kept; peak
memory is about the model plus ``chunk_size`` per-example gradients (``chunk_size x`` parameter bytes).

transformers turns a 2D attention mask into 4D with code that vmap cannot trace, so each example gets a
hand-built additive 4D mask (padding, plus causality for decoders); prepared 4D masks are used as given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .calibration import CAUSAL_LM, CLASSIFICATION, ESTIMATORS, autocast_context, task_of
from .errors import CalibrationDataError, FisherFileError, FisherMaskError
from .fingerprint import weight_files

FULL_FORMAT = "mergekit-fisher-mask/full"
FULL_FORMAT_VERSION = 1
INDEX_NAME = "fisher.safetensors.index.json"


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


def _example_loss(model, task: str, params, buffers, input_ids, attention_mask, label) -> torch.Tensor:
    """Loss of one example (vmapped): mean next-token CE for LMs, CE/MSE for classifiers."""
    mask = _additive_mask(attention_mask, causal=task == CAUSAL_LM, dtype=torch.float32)
    inputs = {"input_ids": input_ids[None], "attention_mask": mask}
    logits = functional_call(model, (params, buffers), (), inputs).logits.float()
    if task == CAUSAL_LM:
        weights = (attention_mask[1:] * attention_mask[:-1]).float()  # (T-1,)
        token_loss = F.cross_entropy(logits[0, :-1], label[1:], reduction="none")
        return (token_loss * weights).sum() / weights.sum()
    if logits.shape[-1] == 1:
        return (logits[0, 0] - label.float()) ** 2
    return F.cross_entropy(logits, label[None])  # logits (1, C)


def compute_full_fisher(
    model,
    dataloader,
    *,
    estimator: str = "empirical",
    accelerator=None,
    chunk_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    mixed_precision: str = "no",
) -> Tuple[Dict[str, torch.Tensor], int]:
    """Return ({parameter name: Fisher}, N); same estimators and normalisation as mask calibration."""
    if estimator not in ESTIMATORS:
        raise FisherMaskError(f"Unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}.")
    if chunk_size < 1:
        raise FisherMaskError(f"chunk_size must be positive, got {chunk_size}.")
    task = task_of(model)
    if estimator == "expected" and task != CLASSIFICATION:
        raise FisherMaskError("The expected Fisher is for classifiers; use --estimator sampled for language models.")
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(estimator == "batch")  # vmap's grad() differentiates the detached copies instead

    def loss(params, input_ids, attention_mask, label):
        return _example_loss(model, task, params, buffers, input_ids, attention_mask, label)

    per_example_grad = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    examples = 0
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    try:
        for batch in tqdm(dataloader, desc="Full Fisher", unit="batch", disable=not show):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            with autocast_context(mixed_precision, accelerator, device):
                if estimator == "batch":
                    _add_batch_square(model, task, params, buffers, batch, sums)
                else:
                    labels = _labels(model, task, estimator, batch, generator)
                    for start in range(0, ids.shape[0], chunk_size):
                        part = slice(start, start + chunk_size)
                        if estimator == "expected":
                            _add_expected(model, per_example_grad, params, ids[part], mask[part], sums)
                            continue
                        grads = per_example_grad(params, ids[part], mask[part], labels[part])  # {name: (C, *shape)}
                        for name, g in grads.items():
                            sums[name] += (g.float() ** 2).sum(dim=0)
                        del grads
            examples += ids.shape[0]
    finally:
        model.train(was_training)
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    count = torch.tensor([float(examples)], device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        sums = {name: accelerator.reduce(value, reduction="sum") for name, value in sums.items()}
        count = accelerator.reduce(count, reduction="sum")
    examples = int(count.item())
    if examples == 0:
        raise CalibrationDataError("The calibration dataloader yielded no examples.")
    if estimator != "batch":
        sums = {name: value / examples for name, value in sums.items()}
    return {name: value.cpu() for name, value in sums.items()}, examples


def _labels(model, task, estimator, batch, generator) -> torch.Tensor:
    """Per-example targets: data labels / next tokens, or draws from the model for the sampled estimator."""
    if estimator != "sampled":
        if task == CAUSAL_LM:
            return batch["input_ids"]
        if "labels" not in batch:
            raise CalibrationDataError("The batch has no labels; the empirical and batch estimators need them.")
        return batch["labels"]
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        probs = torch.softmax(model(**inputs).logits.float(), dim=-1)
    if task == CLASSIFICATION:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    # Position t predicts token t+1: shift the draws right so that label[t+1] is what position t produced.
    draws = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])
    return torch.cat([batch["input_ids"][:, :1], draws[:, :-1]], dim=1)


def _add_expected(model, per_example_grad, params, ids, mask, sums) -> None:
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # (C, K)
    for label in range(probs.shape[-1]):
        targets = torch.full((ids.shape[0],), label, dtype=torch.long, device=ids.device)
        grads = per_example_grad(params, ids, mask, targets)
        for name, g in grads.items():
            weight = probs[:, label].view(-1, *([1] * (g.ndim - 1)))
            sums[name] += (weight * g.float() ** 2).sum(dim=0)


def _add_batch_square(model, task, params, buffers, batch, sums) -> None:
    """The authors' variant: square the gradient of the batch's mean loss (one ordinary backward pass)."""
    from .calibration import _per_example_losses

    losses = _per_example_losses(model, batch, task, "batch", None, None)
    names = list(params)
    grads = torch.autograd.grad(losses.mean(), [dict(model.named_parameters())[n] for n in names])
    for name, g in zip(names, grads):
        sums[name] += g.float() ** 2


def save_full_fisher(
    fisher: Dict[str, torch.Tensor], model_dir: Path, out_dir: Path, metadata: Dict[str, str]
) -> Path:
    """Write Fisher tensors under the model's own names, sharded like the model, plus an index with metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_of = {}
    for file in weight_files(Path(model_dir)):
        with safe_open(str(file), framework="pt") as handle:
            shard_of.update({name: file.name for name in handle.keys()})
    shards = sorted(set(shard_of.values())) or ["model.safetensors"]
    rename = {shard: f"fisher-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, shard in enumerate(shards)}
    groups: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in rename.values()}
    for name, tensor in fisher.items():
        groups[rename[shard_of.get(name, shards[-1])]][name] = tensor.contiguous()
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in fisher.values()))
    meta = {**metadata, "format": FULL_FORMAT, "format_version": str(FULL_FORMAT_VERSION), "l2_norm": repr(float(norm))}
    weight_map = {}
    for file, tensors in groups.items():
        if not tensors:
            continue
        partial = out_dir / (file + ".partial")
        save_file(tensors, str(partial), metadata={"format": FULL_FORMAT})
        os.replace(partial, out_dir / file)
        weight_map.update({name: file for name in tensors})
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    # The index is written last: a crash before it leaves no file that claims to be complete.
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return out_dir


class FullFisherReader:
    """Reads one tensor at a time from a full-Fisher folder; never loads the whole file."""

    def __init__(self, path: str):
        folder = Path(path)
        index_path = folder / INDEX_NAME if folder.is_dir() else folder
        if not index_path.is_file():
            raise FisherFileError(
                f"{path}: no {INDEX_NAME} found. A full Fisher is a folder written by `mergekit-fisher calibrate --full`."
            )
        try:
            index = json.loads(index_path.read_text())
            self.metadata: Dict[str, str] = index["metadata"]
            self.weight_map: Dict[str, str] = index["weight_map"]
        except (ValueError, KeyError) as error:
            raise FisherFileError(f"{index_path} is not a valid full-Fisher index ({error!r}).") from error
        if self.metadata.get("format") != FULL_FORMAT:
            raise FisherFileError(f"{index_path} is not a full-Fisher index (format {self.metadata.get('format')!r}).")
        if int(self.metadata.get("format_version", -1)) != FULL_FORMAT_VERSION:
            raise FisherFileError(f"{index_path} has unsupported format_version {self.metadata.get('format_version')}.")
        self.folder = index_path.parent
        self.l2_norm = float(self.metadata.get("l2_norm", "nan"))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        file = self.folder / self.weight_map[name]
        try:
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(name)
        except Exception as error:  # missing or corrupt shard
            raise FisherFileError(f"{file}: cannot read Fisher tensor {name} ({error}).") from error
        if not torch.isfinite(tensor).all():
            raise FisherFileError(f"{file}: Fisher tensor {name} contains NaN or inf.")
        return tensor
