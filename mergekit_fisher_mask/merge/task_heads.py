"""Task heads (a classifier's ``classifier.*``, ``score.*``, ...) of models fine-tuned on different tasks: merge
them, or keep them out of the merge and copy the base model's in.

mergekit checks tensor shapes before any kernel runs, so heads with different ``num_labels`` cannot even reach a
kernel. :func:`choose_task_heads` decides, from the ``--heads`` policy and the checkpoints' headers, which head
tensors come from ``base_model``; the merge then reads every model through a definition without them
(:func:`mergekit_definitions.without_weights`), and :func:`copy_task_head` adds the base model's head to the output
as one more shard. These are "task heads"; attention heads are the mask nodes of :mod:`mergekit_fisher_mask.architectures`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from safetensors import safe_open

from ..architectures import ArchitectureSpec
from ..checkpoints import SAFETENSORS_INDEX, iter_tensor_headers
from ..errors import FisherMaskError, RecipeError, option
from ..outputs import rename, save_tensors, write_json
from .mergekit_definitions import planned_names

__all__ = ["TASK_HEAD_POLICIES", "choose_task_heads", "copy_task_head", "planned_names", "restore_architectures",
           "task_head_tensors"]

LOG = logging.getLogger(__name__)

TASK_HEAD_POLICIES = ("auto", "base", "merge")


def task_head_tensors(spec: ArchitectureSpec, model_dir: Path) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of a checkpoint's task-head tensors (read from safetensors headers only)."""
    return {name: shape for name, _, shape, _, _ in iter_tensor_headers(Path(model_dir)) if spec.is_task_head(name)}


def choose_task_heads(
    spec: ArchitectureSpec,
    recipe,
    model_dirs: Mapping[str, Path],
    base: str,
    configs: Mapping[str, object],
    policy: str,
    merge_config,
    merge_options,
) -> List[str]:
    """Names of task-head tensors to take from the base model instead of merging (empty: merge them).

    ``model_dirs`` and ``configs`` map each model reference of ``recipe`` to its folder and HF config.
    """
    if policy not in TASK_HEAD_POLICIES:
        raise FisherMaskError(f"{option('task_heads')} must be one of {', '.join(TASK_HEAD_POLICIES)}, got {policy!r}.")
    # mergekit compares the shapes of every model it reads, the base model included even when it is not merged.
    references = list(dict.fromkeys(recipe.model_references() + [base]))
    merged = [task_head_tensors(spec, model_dirs[reference]) for reference in references]
    if not any(merged):  # no task heads at all (e.g. causal LMs): nothing to take from anywhere
        return []
    # mergekit plans some head classes (e.g. BERT's question answering) from another class's tensor names and would
    # silently leave the head out of the output.
    unplanned = sorted(set(merged[0]) - planned_names(merge_config, merge_options, configs[base]))
    if unplanned and policy == "merge":
        raise RecipeError(
            f"{recipe.path}: mergekit 0.1.5 does not plan the task-head tensors {', '.join(unplanned)} of "
            f"{configs[base].architectures[0]}, so they cannot be merged. Use {option('task_heads')} auto or base to "
            "take them from base_model."
        )
    same_shapes = all(heads == merged[0] for heads in merged)
    if policy == "merge" and not same_shapes:
        shapes = "; ".join(f"{reference}: " + ", ".join(f"{name} {tuple(shape)}" for name, shape in sorted(heads.items()))
                           for reference, heads in zip(references, merged))
        raise RecipeError(
            f"{recipe.path}: {option('task_heads')} merge needs task heads of one shape, and these differ ({shapes}). "
            f"Use {option('task_heads')} auto or base to take the head from base_model."
        )
    if policy == "merge" or policy == "auto" and not unplanned and same_shapes:
        return []
    if unplanned and policy == "auto":
        LOG.warning("mergekit 0.1.5 does not plan %s; taking them from base model %s.", ", ".join(unplanned), base)
    names = sorted(task_head_tensors(spec, model_dirs[base]))
    if not names:
        raise RecipeError(
            f"{recipe.path}: the models' task heads differ in shape (e.g. different num_labels), and base model "
            f"{base} has no task head to use instead. Set base_model to one of the fine-tuned models."
        )
    LOG.info("Taking the task head (%s) and config from base model %s.", ", ".join(names), base)
    return names


def copy_task_head(base_dir: Path, out_dir: Path, names: List[str], *, dtype: Optional[str] = None) -> None:
    """Add the base model's ``names`` tensors to the merged checkpoint in ``out_dir`` as an extra shard."""
    from mergekit.common import dtype_from_name

    wanted = set(names)
    tensors = {name: rows(0, shape[0]) for name, _, shape, rows, _ in iter_tensor_headers(Path(base_dir)) if name in wanted}
    if dtype:
        tensors = {name: tensor.to(dtype_from_name(dtype)) for name, tensor in tensors.items()}
    weight_map = _weight_map(out_dir)
    shards = sorted(set(weight_map.values()))
    total = len(shards) + 1
    renamed = {old: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, old in enumerate(shards)}
    for old, new in renamed.items():
        rename(out_dir / old, out_dir / new)
    head_file = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_tensors(tensors, out_dir / head_file, {"format": "pt"})
    weight_map = {name: renamed[shard] for name, shard in weight_map.items()}
    weight_map.update({name: head_file for name in tensors})
    size = sum((out_dir / shard).stat().st_size for shard in set(weight_map.values()))
    write_json(out_dir / SAFETENSORS_INDEX, {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))})


def restore_architectures(out_dir: Path, architectures: List[str]) -> None:
    """Give the output config the base model's ``architectures``: mergekit writes the name of the definition it
    merged with, which for a merge without task heads is the plugin's own (``override_architecture``)."""
    config = json.loads((out_dir / "config.json").read_text())
    write_json(out_dir / "config.json", {**config, "architectures": list(architectures)})


def _weight_map(out_dir: Path) -> Dict[str, str]:
    index = out_dir / SAFETENSORS_INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as handle:
        return {name: "model.safetensors" for name in handle.keys()}
