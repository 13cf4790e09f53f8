"""``mergekit-fisher merge``: check everything, calibrate what is missing, run mergekit, publish the folder atomically.

Order matters: every check that can fail runs before anything is written, mergekit writes into a hidden sibling
folder, and only a finished merge (weights, task head, config, card) is renamed to the output path. An interrupted
merge therefore never leaves a folder that looks complete, and input checkpoints are only ever read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .architectures import ARCHITECTURES, ArchitectureSpec, NodeShape, get_architecture
from .errors import FisherFileError, FisherMaskError, RecipeError
from .fingerprint import model_fingerprint, resolve_model_dir
from .fisher_file import check_matches_model, load_mask_fisher
from .full_fisher import INDEX_NAME, FullFisherReader
from .heads import copy_task_head, excluding_weights, task_head_tensors
from .inspection import summarize_mask
from .model_card import write_model_card
from .recipe import PLUGIN_METHODS, CalibrationRequest, Recipe, load_recipe

LOG = logging.getLogger(__name__)

MARKER = "fisher_merge.json"  # written last: its presence means the folder holds a finished merge
HEAD_POLICIES = ("auto", "base", "merge")


@dataclass(frozen=True)
class InputModel:
    reference: str
    directory: Path
    config: object

    @functools.cached_property
    def fingerprint(self) -> str:
        """Computed once per merge: it keys the calibration cache and checks each Fisher file."""
        return model_fingerprint(self.directory)


def default_cache_dir() -> Path:
    root = os.environ.get("MERGEKIT_FISHER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mergekit-fisher-mask"
    )
    return Path(root)


def check_output_dir(out_path: str, overwrite: bool) -> None:
    """Refuse a non-empty output folder (it may hold a previous merge) unless ``overwrite``."""
    out = Path(out_path)
    if out.exists() and not out.is_dir():
        raise FisherMaskError(f"Output path {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a previous merge" if (out / MARKER).exists() or (out / "config.json").exists() else "files"
        raise FisherMaskError(f"Output folder {out} already holds {what}. Pass --overwrite to replace it.")


def _load_inputs(recipe: Recipe) -> Dict[str, InputModel]:
    from transformers import AutoConfig

    references = [str(entry["model"]) for entry in recipe.model_entries()]
    if recipe.config.get("base_model"):
        references.append(str(recipe.config["base_model"]))
    inputs = {}
    for reference in dict.fromkeys(references):
        if "+" in reference and not os.path.exists(reference):
            raise RecipeError(f"{recipe.path}: model {reference!r}: LoRA references are not supported; merge the LoRA first.")
        directory = resolve_model_dir(reference)
        inputs[reference] = InputModel(reference, directory, AutoConfig.from_pretrained(directory))
    return inputs


def _check_shapes(recipe: Recipe, inputs: Dict[str, InputModel]) -> NodeShape:
    """All merged models must be supported and share one node layout and vocabulary size."""
    shapes = {}
    for reference in (str(entry["model"]) for entry in recipe.model_entries()):
        config = inputs[reference].config
        shapes[reference] = (NodeShape.from_config(config, where=f"model {reference}"), config.vocab_size)
    first_ref, first = next(iter(shapes.items()))
    for reference, shape in shapes.items():
        if shape != first:
            raise RecipeError(
                f"Models {first_ref} and {reference} have different shapes ({first[0]}, vocab {first[1]} vs "
                f"{shape[0]}, vocab {shape[1]}); fisher_mask merges models of one architecture and size."
            )
    return first[0]


def _check_slices(recipe: Recipe) -> None:
    """The kernel reads the layer index from the output tensor name, so every slice must map layers 1:1."""
    position = 0
    for index, output_slice in enumerate(recipe.config.get("slices") or []):
        ranges = {tuple(source.get("layer_range", ())) for source in output_slice.get("sources") or []}
        if len(ranges) != 1 or next(iter(ranges))[0] != position:
            raise RecipeError(
                f"{recipe.path}: slices[{index}] takes layers {sorted(ranges)} into output layers starting at "
                f"{position}. fisher_mask needs every source to use the same layer_range, in order, without "
                "shifting layers (e.g. one slice with layer_range [0, num_layers])."
            )
        position = next(iter(ranges))[1]


def _calibration_cache_key(request: CalibrationRequest, fingerprint: str) -> str:
    data = request.data
    stamp = None
    if os.path.isfile(data):
        stat = os.stat(data)
        stamp = [stat.st_size, stat.st_mtime_ns]
    payload = json.dumps(
        {"fingerprint": fingerprint, "data": data, "stamp": stamp, "settings": request.settings.as_dict()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def run_calibrations(recipe: Recipe, inputs: Dict[str, InputModel], cache_dir: Path, *, progress: bool = True) -> None:
    """Calibrate each model that has ``calibration_data`` and no ``fisher``, reusing cached results.

    ``fisher_mask`` gets a mask-Fisher file, ``fisher`` a full-Fisher folder (its index is written last, so a
    folder with an index is complete).
    """
    from . import calibration

    full = recipe.method == "fisher"
    for request in recipe.calibrations:
        model = inputs[request.model]
        key = _calibration_cache_key(request, model.fingerprint)
        path = cache_dir / (f"full-{key}" if full else f"{key}.safetensors")
        done = (path / INDEX_NAME).is_file() if full else path.is_file()
        if done:
            LOG.info("Using cached Fisher for %s: %s", request.model, path)
        elif full:
            LOG.info("Calibrating full Fisher of %s on %s -> %s", request.model, request.data, path)
            calibration.calibrate_full(str(model.directory), request.data, path, request.settings, progress=progress)
        else:
            LOG.info("Calibrating %s on %s -> %s", request.model, request.data, path)
            calibration.calibrate(str(model.directory), request.data, path, request.settings, progress=progress)
        request.parameters["fisher"] = str(path)


def _check_fishers(recipe: Recipe, inputs: Dict[str, InputModel], verify_fingerprint: bool) -> Dict[str, dict]:
    """Load and validate every Fisher file against its model; return per-model calibration provenance."""
    provenance = {}
    for entry in recipe.model_entries():
        reference = str(entry["model"])
        fisher_path = (entry.get("parameters") or {}).get("fisher")
        if fisher_path is None:
            raise RecipeError(
                f"{recipe.path}: model {reference!r} has neither `fisher` nor `calibration_data` in its parameters."
            )
        model = inputs[reference]
        where = f"Fisher file {fisher_path} (model {reference})"
        fingerprint = model.fingerprint if verify_fingerprint else None
        if recipe.method == "fisher":
            provenance[reference] = _check_full_fisher(fisher_path, model, fingerprint, where)
            continue
        fisher = load_mask_fisher(fisher_path)
        check_matches_model(fisher, NodeShape.from_config(model.config), fingerprint, where=where)
        summary = summarize_mask(fisher)
        provenance[reference] = {
            "fisher": str(fisher_path),
            "samples": fisher.samples,
            "estimator": fisher.estimator,
            "loss": fisher.loss,
            "data": fisher.data.get("source"),
            "summary": f"top 10% of heads hold {summary.head_top10_share:.1%} of head Fisher, "
            f"top 10% of neurons {summary.ffn_top10_share:.1%}",
        }
    return provenance


def _check_full_fisher(path: str, model: InputModel, fingerprint: Optional[str], where: str) -> dict:
    reader = FullFisherReader(path)
    meta = reader.metadata
    if meta.get("model_type") != model.config.model_type:
        raise FisherFileError(
            f"{where} was measured on a {meta.get('model_type')!r} model; this model is {model.config.model_type!r}."
        )
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise FisherFileError(
            f"{where} was measured on a different model (fingerprint {meta.get('fingerprint')}, this model has "
            f"{fingerprint}). Re-calibrate, or pass --no-verify-fingerprint."
        )
    data = json.loads(meta.get("data", "{}"))
    return {
        "fisher": str(path),
        "samples": int(meta.get("samples", 0)),
        "estimator": meta.get("estimator"),
        "loss": meta.get("loss"),
        "data": data.get("source"),
        "summary": f"L2 norm {reader.l2_norm:.3e}",
    }


@contextlib.contextmanager
def _staging_dir(out_path: str):
    """A hidden sibling folder for the merge; removed unless it was published."""
    out = Path(out_path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out_path: str) -> None:
    """Move the finished merge into place; an existing (overwritten) folder is replaced only at the very end."""
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp (and mergekit's shard writer) create private files; the result should look like any saved model.
    os.chmod(staging, 0o777 & ~umask)
    for file in staging.iterdir():
        os.chmod(file, 0o666 & ~umask)
    out = Path(out_path).absolute()
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, previous)
    os.replace(staging, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _set_base_model(recipe: Recipe) -> None:
    if recipe.config.get("base_model"):
        return
    first = str(recipe.model_entries()[0]["model"])
    LOG.warning(
        "The recipe has no base_model: taking the config, tokenizer and task head from the first model, %s. "
        "Set base_model to choose another.",
        first,
    )
    recipe.config["base_model"] = first


def run_fisher_merge(
    recipe_path: str,
    out_path: str,
    merge_options,
    *,
    overwrite: bool = False,
    verify_fingerprint: bool = True,
    heads: str = "auto",
    cache_dir: Optional[Path] = None,
) -> Path:
    """Run a recipe end to end and return the output folder; see the module docstring for the guarantees."""
    from mergekit.merge import run_merge

    if heads not in HEAD_POLICIES:
        raise FisherMaskError(f"heads must be one of {', '.join(HEAD_POLICIES)}, got {heads!r}.")
    recipe = load_recipe(recipe_path)
    check_output_dir(out_path, overwrite)
    if not recipe.model_entries():
        raise RecipeError(f"{recipe_path}: the recipe names no models.")
    plugin = recipe.method in PLUGIN_METHODS
    if recipe.calibrations and not plugin:
        raise RecipeError(f"{recipe_path}: calibration_data is only used by {', '.join(PLUGIN_METHODS)}.")
    _set_base_model(recipe)
    inputs = _load_inputs(recipe)
    base = inputs[str(recipe.config["base_model"])]
    # Task-head handling needs only the table's head pattern, so it applies to every method (linear too).
    spec: Optional[ArchitectureSpec] = ARCHITECTURES.get(base.config.model_type)
    provenance: Dict[str, dict] = {}
    if plugin:
        _check_shapes(recipe, inputs)
        _check_slices(recipe)
        spec = get_architecture(base.config.model_type, where=f"base model {base.reference}")
    merge_config = recipe.merge_configuration()  # validate before the (slow) calibration
    if plugin:
        run_calibrations(recipe, inputs, cache_dir or default_cache_dir(), progress=not merge_options.quiet)
        provenance = _check_fishers(recipe, inputs, verify_fingerprint)
        merge_config = recipe.merge_configuration()  # now with the calibrated `fisher` paths

    head_names = _heads_from_base(spec, recipe, inputs, base, heads) if spec is not None else []
    options = merge_options.model_copy(
        update={
            "write_model_card": False,  # ours is written below; mergekit's calls the Hub for local paths
            "copy_tokenizer": merge_options.copy_tokenizer and _has_tokenizer(base.directory),
        }
    )
    with _staging_dir(out_path) as staging:
        with excluding_weights(spec, head_names):
            run_merge(merge_config, str(staging), options=options, config_source=recipe.source_text)
        if head_names:
            copy_task_head(base.directory, staging, head_names, dtype=merge_config.out_dtype or merge_config.dtype)
        write_model_card(staging, recipe, provenance, heads_from=base.reference if head_names else None)
        (staging / MARKER).write_text(
            json.dumps({"method": recipe.method, "models": provenance, "heads_from_base": head_names}, indent=2)
        )
        _publish(staging, out_path)
    return Path(out_path)


def _heads_from_base(
    spec: ArchitectureSpec, recipe: Recipe, inputs: Dict[str, InputModel], base: InputModel, policy: str
) -> List[str]:
    """Names of task-head tensors to take from the base model instead of merging (empty: merge them)."""
    if policy == "merge":
        return []
    merged = [task_head_tensors(spec, inputs[str(e["model"])].directory) for e in recipe.model_entries()]
    if not any(merged):  # no task heads at all (e.g. causal LMs): nothing to take from anywhere
        return []
    if policy == "auto" and all(heads == merged[0] for heads in merged):
        return []
    names = sorted(task_head_tensors(spec, base.directory))
    if not names:
        raise RecipeError(
            f"{recipe.path}: the models' task heads differ in shape (e.g. different num_labels), and base model "
            f"{base.reference} has no task head to use instead. Set base_model to one of the fine-tuned models."
        )
    LOG.info("Taking the task head (%s) and config from base model %s.", ", ".join(names), base.reference)
    return names


def _has_tokenizer(directory: Path) -> bool:
    # mergekit "reserializes" a tokenizer from a folder without one, producing a bogus tokenizer.
    return (directory / "tokenizer_config.json").is_file()
