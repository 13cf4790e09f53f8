"""Task heads of classifiers fine-tuned on different tasks: keep them out of the merge, then copy the base's in.

mergekit checks tensor shapes before any kernel runs, so heads with different ``num_labels`` cannot even reach a
kernel. We hide them from mergekit's architecture definition for the duration of the merge, and afterwards add the
``base_model``'s head to the output as one more shard.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

from mergekit.architecture.base import ModuleArchitecture, ModuleDefinition
from safetensors import safe_open
from safetensors.torch import save_file

from ..architectures import ArchitectureSpec
from ..checkpoints import SAFETENSORS_INDEX, iter_tensor_headers


def task_head_tensors(spec: ArchitectureSpec, model_dir: Path) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of a checkpoint's task-head tensors (read from safetensors headers only)."""
    return {name: shape for name, _, shape, _, _ in iter_tensor_headers(Path(model_dir)) if spec.is_task_head(name)}


def planned_names(merge_config, options, config) -> Set[str]:
    """Every tensor name mergekit's plan for this recipe writes or reads (names, aliases and tied names)."""
    from mergekit.architecture import get_architecture_info

    names: Set[str] = set()
    for weight in get_architecture_info(merge_config, options).all_weights(config):
        names.update([weight.name, *(weight.aliases or ()), *(weight.tied_names or ())])
    return names


class _WithoutWeights(ModuleArchitecture):
    """A module architecture that hides the named weights and otherwise defers to ``inner``."""

    def __init__(self, inner: ModuleArchitecture, hidden: Iterable[str]):
        self.inner, self.hidden = inner, frozenset(hidden)

    def _keep(self, weights):
        return [w for w in weights if w.name not in self.hidden]

    def pre_weights(self, config):
        return self._keep(self.inner.pre_weights(config))

    def post_weights(self, config):
        return self._keep(self.inner.post_weights(config))

    def layer_weights(self, index, config):
        return self._keep(self.inner.layer_weights(index, config))

    def num_layers_config_key(self) -> str:
        return self.inner.num_layers_config_key()

    def num_layers(self, config) -> int:
        return self.inner.num_layers(config)


@contextlib.contextmanager
def excluding_weights(names: List[str]):
    """Within the block, mergekit's ``run_merge`` plans no tensor in ``names``."""
    if not names:
        yield
        return
    import mergekit.merge

    original = mergekit.merge.get_architecture_info

    def without_heads(*args, **kwargs):
        info = original(*args, **kwargs)
        modules = {
            key: ModuleDefinition(
                architecture=_WithoutWeights(module.architecture, names),
                weight_prefix=module.weight_prefix,
                subfolder=module.subfolder,
            )
            for key, module in info.modules.items()
        }
        return info.model_copy(update={"modules": modules})

    mergekit.merge.get_architecture_info = without_heads
    try:
        yield
    finally:
        mergekit.merge.get_architecture_info = original


def copy_task_head(base_dir: Path, out_dir: Path, names: List[str], dtype: Optional[str] = None) -> None:
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
        os.replace(out_dir / old, out_dir / new)
    head_file = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / head_file), metadata={"format": "pt"})
    weight_map = {name: renamed[shard] for name, shard in weight_map.items()}
    weight_map.update({name: head_file for name in tensors})
    size = sum((out_dir / shard).stat().st_size for shard in set(weight_map.values()))
    with open(out_dir / SAFETENSORS_INDEX, "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, handle, indent=2)


def _weight_map(out_dir: Path) -> Dict[str, str]:
    index = out_dir / SAFETENSORS_INDEX
    if index.is_file():
        with open(index, encoding="utf-8") as handle:
            return json.load(handle)["weight_map"]
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as handle:
        return {name: "model.safetensors" for name in handle.keys()}
