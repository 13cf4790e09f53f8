"""``mergekit-fisher merge``: check everything, calibrate what is missing, run mergekit, publish the folder atomically.

Order matters: every check that can fail runs before anything is written (the recipe, every model folder, the
output path against every input, every statistic file), mergekit writes into a hidden sibling folder, and only a
finished merge (weights, task head, config, card, and last the marker file) is renamed to the output path. An
interrupted merge therefore never leaves a folder that looks complete, a folder this tool did not write is never
replaced, and inputs are only read.

This module and :mod:`.cli` are the only ones that use both :mod:`.calibration` (through :mod:`.cache`) and
:mod:`.merge`; each step below is another module's job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

from .architectures import ARCHITECTURES, get_architecture
from .cache import InputModel, cache_key, calibrate_missing, default_cache_dir
from .calibration.api import check_settings_apply
from .calibration.placement import check_device_available
from .checkpoints import check_weights, has_tokenizer, load_config, resolve_model_dir, weight_bytes
from .errors import RecipeError, recipe_keys
from .merge.mergekit_definitions import without_weights
from .merge.model_card import write_model_card
from .merge.recipe import Recipe, load_recipe, local_model
from .merge.task_heads import TASK_HEAD_POLICIES, choose_task_heads, copy_task_head, restore_architectures
from .outputs import (
    MARKER,
    MERGE_OUTPUT,
    OutputClaim,
    check_no_overlap,
    check_scratch_folder,
    claim_output,
    foreign_files,
    is_merge_output,
    publish,
    staged_folder,
    write_marker,
)
from .paths import user_path

LOG = logging.getLogger(__name__)

HEAD_POLICIES = TASK_HEAD_POLICIES  # names before 0.3
calibration_cache_key = cache_key
# Names that lived here before 0.3 and moved to their owners.
__all__ = ["HEAD_POLICIES", "InputModel", "MARKER", "TASK_HEAD_POLICIES", "calibration_cache_key", "default_cache_dir",
           "foreign_files", "is_merge_output", "run_fisher_merge"]


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


def _load_inputs(recipe: Recipe) -> Dict[str, InputModel]:
    """Resolve every model once and read its config and weight headers, so a broken folder fails before any work."""
    inputs = {}
    for reference in dict.fromkeys(recipe.model_references() + [recipe.base_model]):
        if "+" in reference and local_model(reference) is None:
            raise RecipeError(f"{recipe.path}: model {reference!r}: LoRA references are not supported; merge the LoRA first.")
        directory = resolve_model_dir(reference)
        config = load_config(directory)
        check_weights(directory)
        inputs[reference] = InputModel(reference, directory, config)
    return inputs


def _claim_output(out: Path, recipe: Recipe, inputs: Dict[str, InputModel], cache_dir: Path, merge_config,
                  overwrite: bool) -> OutputClaim:
    """The output may replace only a previous merge of this tool, and may never touch an input."""
    protected = {f"input model {m.reference!r} at": m.directory for m in inputs.values()}
    check_no_overlap(cache_dir, protected, name="cache_dir")  # calibrated files must not land in a model folder
    protected["the recipe"] = Path(recipe.path)
    protected["the calibration cache"] = cache_dir
    for location in recipe.model_locations():
        statistic = recipe.statistic_path(location)
        if statistic and Path(statistic).exists():
            what = recipe.plugin.statistic.noun() if recipe.plugin else "file"
            protected[f"the {what} of {recipe.entry(location)['model']!r},"] = Path(statistic)
    for request in recipe.calibrations:
        if Path(request.data).exists():
            protected[f"the calibration data of {request.model!r},"] = Path(request.data)
    base = inputs[recipe.base_model]
    size = weight_bytes(base.directory, merge_config.out_dtype or merge_config.dtype)
    claim = claim_output(out, MERGE_OUTPUT, overwrite=overwrite, inputs=protected, name="output", needed_bytes=size)
    for request in recipe.calibrations:  # scratch folders for offloaded weights: never in an input or the output
        if request.settings.offload_folder:
            with recipe_keys():
                check_scratch_folder(request.settings.offload_folder, inputs={**protected, "the output": out},
                                     name="offload_folder")
    return claim


def _check_statistics(recipe: Recipe, inputs: Dict[str, InputModel], verify_fingerprint: bool) -> Dict[str, dict]:
    """Read every model's statistic file and check it against that model; return provenance for the model card."""
    plugin, provenance, records = recipe.plugin, {}, {}
    for location in recipe.model_locations():
        reference = str(recipe.entry(location)["model"])
        path = recipe.statistic_path(location)
        if path is None:
            continue  # the kernel reports models without a file, with mergekit's view of the recipe
        model = inputs[reference]
        record = plugin.statistic.read(path)
        where = f"{plugin.statistic.DESCRIPTION} {path} (model {reference})"
        record.check_matches_model(model.config, model.fingerprint if verify_fingerprint else None, where=where)
        provenance[reference], records[where] = record.card_row(path), record
    if len(records) > 1:
        plugin.statistic.check_compatible(records)
    return provenance


def run_fisher_merge(
    recipe_path,
    out_path,
    merge_options,
    *,
    overwrite: bool = False,
    verify_fingerprint: bool = True,
    heads: str = "auto",
    cache_dir=None,
) -> Path:
    """Run a recipe end to end and return the output folder; see the module docstring for the guarantees."""
    from mergekit.merge import run_merge

    out = user_path(out_path)
    if merge_options.device:  # mergekit's --gpu-rich, --cuda or --device: a device this machine has
        typed = next((flag for flag in ("gpu_rich", "cuda") if getattr(merge_options, flag, False)), "device")
        check_device_available(merge_options.device, name=typed)  # named as the option the user typed
    with recipe_keys():  # settings from the recipe are named as its keys
        recipe = load_recipe(recipe_path)
        for request in recipe.calibrations if recipe.plugin else ():
            check_settings_apply(request.settings, recipe.plugin.statistic,
                                 where=f"{recipe.path}: calibration of {request.model!r}",
                                 remedy="change merge_method")
    if not recipe.model_locations():
        raise RecipeError(f"{recipe.path}: the recipe names no models.")
    recipe = _with_base_model(recipe)
    inputs = _load_inputs(recipe)
    base = inputs[recipe.base_model]
    cache_dir = user_path(cache_dir) if cache_dir else default_cache_dir()
    merge_config = recipe.merge_configuration()  # validated before any (slow) work
    claim = _claim_output(out, recipe, inputs, cache_dir, merge_config, overwrite)
    configs = {reference: model.config for reference, model in inputs.items()}
    plugin = recipe.plugin
    if plugin:
        recipe.check_shapes(configs)
        recipe.check_slices()
    # Task-head handling needs only the table's head pattern, so it applies to every method (linear too).
    spec = get_architecture(base.config.model_type, where=f"base model {base.reference}") if plugin else (
        ARCHITECTURES.get(base.config.model_type))
    model_dirs = {reference: model.directory for reference, model in inputs.items()}
    head_names = choose_task_heads(spec, recipe, model_dirs, recipe.base_model, configs, heads, merge_config,
                                   merge_options) if spec else []
    provenance: Dict[str, dict] = {}
    if plugin:
        _check_statistics(recipe, inputs, verify_fingerprint)  # the files the recipe gives, before calibrating others
        paths = calibrate_missing(recipe.calibrations, inputs, cache_dir, plugin.statistic,
                                  progress=not merge_options.quiet)
        recipe = recipe.with_statistic_paths(paths)
        provenance = _check_statistics(recipe, inputs, verify_fingerprint)
    override = without_weights(merge_config, merge_options, head_names, base.config) if head_names else None
    merge_config = recipe.merge_configuration(override)
    options = merge_options.model_copy(update={
        "write_model_card": False,  # ours is written below; mergekit's calls the Hub for local paths
        # mergekit "reserializes" a tokenizer from a folder without one, producing a bogus tokenizer.
        "copy_tokenizer": merge_options.copy_tokenizer and has_tokenizer(base.directory),
    })
    with staged_folder(out) as staging:
        run_merge(merge_config, str(staging), options=options, config_source=recipe.source_text)
        if head_names:
            copy_task_head(base.directory, staging, head_names, dtype=merge_config.out_dtype or merge_config.dtype)
            restore_architectures(staging, base.config.architectures)
        write_model_card(staging, recipe, provenance, config=base.config,
                         heads_from=base.reference if head_names else None)
        write_marker(staging, {"method": recipe.method, "models": provenance, "heads_from_base": head_names})
        publish(staging, out, claim)
    return out
