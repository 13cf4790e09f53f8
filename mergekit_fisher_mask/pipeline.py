"""``mergekit-fisher merge``: check everything, calibrate what is missing, run mergekit, publish the folder atomically.

Order matters: every check that can fail runs before anything is written (the output path against every input,
the recipe, every model folder, every Fisher file), mergekit writes into a hidden sibling folder, and only a
finished merge (weights, task head, config, card, and last the marker file) is renamed to the output path. An
interrupted merge therefore never leaves a folder that looks complete, a folder this tool did not write is never
replaced, and inputs are only ever read.

This is the one module that uses both :mod:`.calibrate` and :mod:`.merge`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .architectures import ARCHITECTURES, ArchitectureSpec, NodeShape, get_architecture
from .calibrate.api import calibrate as calibrate_mask
from .calibrate.api import calibrate_full
from .calibrate.placement import accelerator_type
from .checkpoints import check_weights, has_tokenizer, load_config, model_fingerprint, resolve_model_dir
from .errors import FisherFileError, FisherMaskError, OutputPathError, RecipeError
from .files import FullFisherReader, check_matches_model, is_full_fisher_dir, is_mask_fisher_file, load_mask_fisher
from .inspection import summarize_mask
from .merge.heads import copy_task_head, excluding_weights, planned_names, task_head_tensors
from .merge.model_card import write_model_card
from .merge.recipe import PLUGIN_METHODS, CalibrationRequest, Recipe, load_recipe
from .outputs import OutputClaim, check_no_overlap, check_replaceable, describe_names, publish, staged_folder

LOG = logging.getLogger(__name__)

MARKER = "fisher_merge.json"  # written last: its presence means the folder holds a finished merge of this tool
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


def _written_files(folder: Path) -> List[str]:
    """Every file under ``folder``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if not p.is_dir())


# What a merge of a version before the marker's file list wrote: mergekit's weights, index, config and card, the
# tokenizer's files, and ours. Only files named like these, at the top of the folder, count as that merge's.
_LEGACY_OUTPUT = re.compile(
    r"(?:model(?:-\d{5}-of-\d{5})?\.safetensors|pytorch_model(?:-\d{5}-of-\d{5})?\.bin|"
    r"(?:model\.safetensors|pytorch_model\.bin)\.index\.json|config\.json|generation_config\.json|"
    r"tokenizer(?:_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.(?:json|txt)|"
    r"merges\.txt|spiece\.model|spm\.model|sentencepiece\.bpe\.model|chat_template\.(?:jinja|json)|"
    r"(?:video_)?preprocessor_config\.json|README\.md|"
    r"mergekit_config\.yml)"
)


def foreign_files(folder: Path) -> List[str]:
    """Files in a merge output that the merge did not write: those its marker does not list (a marker of an older
    version, without the list: those not named as a merge names its files); every file if there is no marker."""
    try:
        written = json.loads((Path(folder) / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):  # no marker, or one that is not ours: nothing here is vouched for
        return [name for name in _written_files(folder) if name != MARKER]
    ours = set(written).__contains__ if isinstance(written, list) else _LEGACY_OUTPUT.fullmatch
    return [name for name in _written_files(folder) if name != MARKER and not ours(name)]


def is_merge_output(folder: Path) -> bool:
    """Whether ``folder`` is a finished merge of this tool that holds nothing the user added."""
    return (Path(folder) / MARKER).is_file() and not foreign_files(folder)


def _load_inputs(recipe: Recipe) -> Dict[str, InputModel]:
    """Resolve every model once and read its config and weight headers, so a broken folder fails before any work."""
    references = recipe.model_references() + ([recipe.base_model] if recipe.base_model else [])
    inputs = {}
    for reference in dict.fromkeys(references):
        if "+" in reference and not os.path.exists(reference):
            raise RecipeError(f"{recipe.path}: model {reference!r}: LoRA references are not supported; merge the LoRA first.")
        directory = resolve_model_dir(reference)
        config = load_config(directory)
        check_weights(directory)
        inputs[reference] = InputModel(reference, directory, config)
    return inputs


def _check_output(
    out_path: str, recipe: Recipe, inputs: Dict[str, InputModel], cache_dir: Path, overwrite: bool
) -> OutputClaim:
    """The output may replace only a previous merge of this tool, and may never touch an input."""
    protected = {f"input model {m.reference!r} at": m.directory for m in inputs.values()}
    protected["the recipe"] = Path(recipe.path)
    protected["the Fisher cache"] = cache_dir
    for location in recipe.model_locations():
        fisher = recipe.fisher_path(location)
        if fisher and os.path.exists(fisher):
            protected[f"the Fisher file of {recipe.entry(location)['model']!r},"] = Path(fisher)
    for request in recipe.calibrations:
        if os.path.exists(request.data):
            protected[f"the calibration data of {request.model!r},"] = Path(request.data)
    check_no_overlap(out_path, protected, option="output")
    extra = foreign_files(Path(out_path)) if (Path(out_path) / MARKER).is_file() else []
    if extra:
        raise OutputPathError(
            f"The output {out_path} holds a previous merge plus files this tool did not write ({describe_names(extra)}); "
            "refusing to replace it. Move those files away, or choose another path."
        )
    return check_replaceable(out_path, overwrite=overwrite, is_ours=is_merge_output, what="a previous merge", folder=True)


def _check_shapes(recipe: Recipe, inputs: Dict[str, InputModel]) -> NodeShape:
    """All merged models must be supported and share one node layout and vocabulary size."""
    shapes = {}
    for reference in recipe.model_references():
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


def calibration_cache_key(request: CalibrationRequest, model: InputModel) -> str:
    """What a cached calibration depends on: the weights, the data (and its file's size and time), and the settings
    that change the result, with ``dtype: auto`` resolved for this machine. Placement (device map, micro-batches)
    is left out."""
    stamp = None
    if os.path.isfile(request.data):
        stat = os.stat(request.data)
        stamp = [stat.st_size, stat.st_mtime_ns]
    settings = request.settings.result_fields()
    settings["dtype"] = request.settings.dtype.resolve(model.config, on_gpu=accelerator_type() is not None)
    payload = {"fingerprint": model.fingerprint, "data": request.data, "stamp": stamp, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def run_calibrations(recipe: Recipe, inputs: Dict[str, InputModel], cache_dir: Path, *, progress: bool = True) -> Recipe:
    """Calibrate each model that has ``calibration_data`` and no ``fisher``, reusing cached results.

    Returns the recipe with every calibrated model's ``fisher`` path filled in. ``fisher_mask`` gets a mask-Fisher
    file, ``fisher`` a full-Fisher folder (both appear under their final name only when complete).
    """
    full = recipe.method == "fisher"
    paths = {}
    for request in recipe.calibrations:
        model = inputs[request.model]
        key = calibration_cache_key(request, model)
        path = cache_dir / (f"full-{key}" if full else f"{key}.safetensors")
        if is_full_fisher_dir(path) if full else is_mask_fisher_file(path):
            LOG.info("Using cached Fisher for %s: %s", request.model, path)
        elif full:
            LOG.info("Calibrating full Fisher of %s on %s -> %s", request.model, request.data, path)
            # The cache is ours: a run that filled the same key meanwhile wrote the same result, so replace it.
            calibrate_full(str(model.directory), request.data, path, request.settings, overwrite=True, progress=progress)
        else:
            LOG.info("Calibrating %s on %s -> %s", request.model, request.data, path)
            calibrate_mask(str(model.directory), request.data, path, request.settings, overwrite=True, progress=progress)
        paths[request.location] = str(path)
    return recipe.with_fisher_paths(paths)


def _check_fishers(recipe: Recipe, inputs: Dict[str, InputModel], verify_fingerprint: bool) -> Dict[str, dict]:
    """Load and check every model's Fisher against that model; return provenance for the model card."""
    provenance = {}
    for location in recipe.model_locations():
        reference = str(recipe.entry(location)["model"])
        path = recipe.fisher_path(location)
        if path is None:
            continue  # the kernel reports models without a Fisher, with mergekit's view of the recipe
        if not isinstance(path, str):
            raise RecipeError(f"{recipe.path}: model {reference}: `fisher` must be a single path, got {path!r}.")
        model = inputs[reference]
        fingerprint = model.fingerprint if verify_fingerprint else None
        where = f"Fisher file {path} (model {reference})"
        if recipe.method == "fisher":
            provenance[reference] = _check_full_fisher(path, model, fingerprint, where)
            continue
        fisher = load_mask_fisher(path)
        check_matches_model(fisher, NodeShape.from_config(model.config, where=reference), fingerprint, where=where)
        summary = summarize_mask(fisher)
        provenance[reference] = {
            "fisher": str(path),
            "samples": fisher.samples,
            "estimator": fisher.estimator,
            "loss": fisher.loss,
            "data": fisher.data.get("source"),
            "summary": "top 10% of nodes hold " + ", ".join(
                f"{share:.1%} of {key.removesuffix('_fisher')}" for key, share in summary.shares.items()
            ),
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


def _with_base_model(recipe: Recipe) -> Recipe:
    if recipe.base_model:
        return recipe
    first = recipe.model_references()[0]
    LOG.warning(
        "The recipe has no base_model: taking the config, tokenizer and task head from the first model, %s. "
        "Set base_model to choose another.",
        first,
    )
    return recipe.with_base_model(first)


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
    cache_dir = Path(cache_dir or default_cache_dir())
    recipe = load_recipe(recipe_path)
    if not recipe.model_locations():
        raise RecipeError(f"{recipe_path}: the recipe names no models.")
    plugin = recipe.method in PLUGIN_METHODS
    if recipe.calibrations and not plugin:
        raise RecipeError(f"{recipe_path}: calibration_data is only used by {', '.join(PLUGIN_METHODS)}.")
    recipe = _with_base_model(recipe)
    inputs = _load_inputs(recipe)
    claim = _check_output(out_path, recipe, inputs, cache_dir, overwrite)
    base = inputs[recipe.base_model]
    # Task-head handling needs only the table's head pattern, so it applies to every method (linear too).
    spec: Optional[ArchitectureSpec] = ARCHITECTURES.get(base.config.model_type)
    provenance: Dict[str, dict] = {}
    if plugin:
        _check_shapes(recipe, inputs)
        _check_slices(recipe)
        spec = get_architecture(base.config.model_type, where=f"base model {base.reference}")
    merge_config = recipe.merge_configuration()  # validate before the (slow) calibration
    head_names = _heads_from_base(spec, recipe, inputs, base, heads, merge_config, merge_options) if spec else []
    if plugin:
        recipe = run_calibrations(recipe, inputs, cache_dir, progress=not merge_options.quiet)
        provenance = _check_fishers(recipe, inputs, verify_fingerprint)
        merge_config = recipe.merge_configuration()  # now with the calibrated `fisher` paths
    options = merge_options.model_copy(
        update={
            "write_model_card": False,  # ours is written below; mergekit's calls the Hub for local paths
            # mergekit "reserializes" a tokenizer from a folder without one, producing a bogus tokenizer.
            "copy_tokenizer": merge_options.copy_tokenizer and has_tokenizer(base.directory),
        }
    )
    with staged_folder(out_path) as staging:
        with excluding_weights(head_names):
            run_merge(merge_config, str(staging), options=options, config_source=recipe.source_text)
        if head_names:
            copy_task_head(base.directory, staging, head_names, dtype=merge_config.out_dtype or merge_config.dtype)
        write_model_card(staging, recipe, provenance, heads_from=base.reference if head_names else None)
        (staging / MARKER).write_text(json.dumps(
            {"method": recipe.method, "models": provenance, "heads_from_base": head_names,
             "files": _written_files(staging)}, indent=2))
        publish(staging, out_path, claim)
    return Path(out_path)


def _heads_from_base(
    spec: ArchitectureSpec, recipe: Recipe, inputs: Dict[str, InputModel], base: InputModel, policy: str,
    merge_config, merge_options,
) -> List[str]:
    """Names of task-head tensors to take from the base model instead of merging (empty: merge them)."""
    merged = [task_head_tensors(spec, inputs[reference].directory) for reference in recipe.model_references()]
    if not any(merged):  # no task heads at all (e.g. causal LMs): nothing to take from anywhere
        return []
    # mergekit plans some head classes (e.g. BERT's question answering) from another class's tensor names and would
    # silently leave the head out of the output.
    unplanned = sorted(set(merged[0]) - planned_names(merge_config, merge_options, base.config))
    if unplanned and policy == "merge":
        raise RecipeError(
            f"{recipe.path}: mergekit 0.1.5 does not plan the task-head tensors {', '.join(unplanned)} of "
            f"{base.config.architectures[0]}, so they cannot be merged. Use --heads auto or base to take them from "
            "base_model."
        )
    same_shapes = all(heads == merged[0] for heads in merged)
    if policy == "merge" and not same_shapes:
        shapes = "; ".join(f"{reference}: " + ", ".join(f"{name} {tuple(shape)}" for name, shape in sorted(heads.items()))
                           for reference, heads in zip(recipe.model_references(), merged))
        raise RecipeError(
            f"{recipe.path}: --heads merge needs task heads of one shape, and these differ ({shapes}). Use --heads "
            "auto or base to take the head from base_model."
        )
    if policy == "merge" or policy == "auto" and not unplanned and same_shapes:
        return []
    if unplanned and policy == "auto":
        LOG.warning("mergekit 0.1.5 does not plan %s; taking them from base model %s.", ", ".join(unplanned),
                    base.reference)
    names = sorted(task_head_tensors(spec, base.directory))
    if not names:
        raise RecipeError(
            f"{recipe.path}: the models' task heads differ in shape (e.g. different num_labels), and base model "
            f"{base.reference} has no task head to use instead. Set base_model to one of the fine-tuned models."
        )
    LOG.info("Taking the task head (%s) and config from base model %s.", ", ".join(names), base.reference)
    return names
