"""Read a mergekit YAML recipe with this plugin's additions, check it strictly, and hand mergekit a clean copy.

Additions that only ``mergekit-fisher merge`` understands (mergekit itself would reject or ignore them):

* per model, ``parameters.calibration_data``: a data source (or a mapping ``{data: ..., <setting>: ...}``) to
  calibrate that model on when it has no ``fisher`` file;
* top level, ``calibration:``: shared :class:`~mergekit_fisher_mask.calibration.CalibrationSettings`.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import yaml
from mergekit.config import MergeConfiguration

from .calibration import CalibrationSettings
from .errors import RecipeError

LOG = logging.getLogger(__name__)

PLUGIN_METHODS = ("fisher_mask", "fisher")
_TOP_LEVEL_KEYS = set(MergeConfiguration.model_fields) | {"calibration"}
_MODEL_KEYS = {"model", "parameters"}
_SLICE_SOURCE_KEYS = {"model", "parameters", "layer_range"}
_SLICE_KEYS = {"sources", "base_model", "residual_weight", "parameters"}
_SETTING_KEYS = {f.name for f in fields(CalibrationSettings)} | {"text_column"}


@dataclass
class CalibrationRequest:
    """A model that should be calibrated before the merge, and where its Fisher path goes in the recipe."""

    model: str
    data: str
    settings: CalibrationSettings
    parameters: Dict[str, Any]  # the model's parameter mapping inside ``Recipe.config``; gets ``fisher`` set


@dataclass
class Recipe:
    """A checked recipe: the dict mergekit will see, the user's original text, and pending calibrations."""

    config: Dict[str, Any]
    source_text: str
    path: str
    calibrations: List[CalibrationRequest] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config["merge_method"]

    def merge_configuration(self) -> MergeConfiguration:
        try:
            return MergeConfiguration.model_validate(copy.deepcopy(self.config))
        except Exception as error:  # pydantic's ValidationError, or mergekit's RuntimeError from validators
            raise RecipeError(f"{self.path}: not a valid mergekit recipe: {error}") from error

    def model_entries(self) -> List[Dict[str, Any]]:
        """Every input-model entry (``models:`` items and slice sources), in recipe order."""
        entries = list(self.config.get("models") or [])
        for output_slice in self.config.get("slices") or []:
            entries.extend(output_slice.get("sources") or [])
        return entries


def _check_keys(found: Dict, allowed: set, where: str) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}. Allowed: {', '.join(sorted(allowed))}.")


def _settings(raw: Dict[str, Any], where: str, base: Optional[Dict[str, Any]] = None) -> CalibrationSettings:
    _check_keys(raw, _SETTING_KEYS, where)
    values = dict(base or {})
    values.update(raw)
    if "text_column" in values:
        column = values.pop("text_column")
        values["text_columns"] = [column] if isinstance(column, str) else list(column)
    try:
        return CalibrationSettings(**values)
    except TypeError as error:
        raise RecipeError(f"{where}: {error}") from error


def _resolve(path_like: Any, base_dir: str, where: str) -> str:
    """Make a recipe-relative local path absolute; leave Hub ids and dataset names alone."""
    if not isinstance(path_like, str):
        raise RecipeError(f"{where}: expected a single path string, got {path_like!r} (filters are not supported here).")
    candidate = os.path.join(base_dir, path_like)
    return os.path.abspath(candidate) if os.path.exists(candidate) else path_like


def _method_parameters(method: str, path: str) -> dict:
    """A registered method's parameter specs by name (mergekit accepts each at top level, per slice and per model)."""
    from mergekit import merge_methods

    from . import register

    register()
    try:
        spec = merge_methods.get(method).spec
    except RuntimeError:
        known = ", ".join(sorted(m.spec.name for m in merge_methods.registered_methods()))
        raise RecipeError(f"{path}: unknown merge_method {method!r}. Known methods: {known}.") from None
    return {parameter.name: parameter for parameter in spec.parameters}


def _check_values(parameters: Dict[str, Any], specs: dict, where: str) -> None:
    """Validate plain scalar values now (filtered and gradient values are left to mergekit)."""
    for name, value in parameters.items():
        if name in specs and isinstance(value, (bool, int, float, str)):
            try:
                specs[name].validate(value)
            except Exception as error:  # pydantic.ValidationError
                raise RecipeError(f"{where}: invalid value {value!r} for {name!r}: {error}") from error


def load_recipe(path: str) -> Recipe:
    """Parse and check a recipe file; raise :class:`RecipeError` naming the file and the offending key."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error}).") from error
    if not isinstance(raw, dict) or "merge_method" not in raw:
        raise RecipeError(f"{path}: a recipe is a mapping with at least `merge_method` and `models` (or `slices`).")
    _check_keys(raw, _TOP_LEVEL_KEYS, path)
    config = copy.deepcopy(raw)
    shared = config.pop("calibration", None) or {}
    if not isinstance(shared, dict):
        raise RecipeError(f"{path}: `calibration` must be a mapping of settings, got {shared!r}.")
    _settings(shared, f"{path}: calibration")  # validate early even if no model needs it
    recipe = Recipe(config=config, source_text=text, path=path, settings=shared)
    base_dir = os.path.dirname(os.path.abspath(path))

    for index, entry in enumerate(config.get("models") or []):
        _check_keys(entry, _MODEL_KEYS, f"{path}: models[{index}]")
    for index, output_slice in enumerate(config.get("slices") or []):
        _check_keys(output_slice, _SLICE_KEYS, f"{path}: slices[{index}]")
        for j, source in enumerate(output_slice.get("sources") or []):
            _check_keys(source, _SLICE_SOURCE_KEYS, f"{path}: slices[{index}].sources[{j}]")

    specs = _method_parameters(config["merge_method"], path)
    allowed = set(specs)
    blocks = [(config.get("parameters") or {}, f"{path}: parameters", allowed)]
    blocks += [
        (s.get("parameters") or {}, f"{path}: slices[{i}].parameters", allowed)
        for i, s in enumerate(config.get("slices") or [])
    ]
    blocks += [  # calibration_data belongs to one model
        (e.get("parameters") or {}, f"{path}: model {e.get('model')!r}: parameters", allowed | {"calibration_data"})
        for e in recipe.model_entries()
    ]
    for parameters, where, names in blocks:
        _check_keys(parameters, names, where)
        _check_values(parameters, specs, where)
    for entry in recipe.model_entries():
        where = f"{path}: model {entry.get('model')!r}"
        parameters = entry.get("parameters")
        if parameters is None:
            continue
        if "fisher" in parameters:
            parameters["fisher"] = _resolve(parameters["fisher"], base_dir, f"{where}: fisher")
        request = parameters.pop("calibration_data", None)
        if request is None:
            continue
        if "fisher" in parameters:
            raise RecipeError(f"{where}: give either `fisher` or `calibration_data`, not both.")
        if isinstance(request, dict):
            request = dict(request)
            if "data" not in request:
                raise RecipeError(f"{where}: calibration_data mapping needs a `data` key.")
            data = request.pop("data")
        else:
            data, request = request, {}
        recipe.calibrations.append(
            CalibrationRequest(
                model=str(entry["model"]),
                data=_resolve(data, base_dir, f"{where}: calibration_data"),
                settings=_settings(request, f"{where}: calibration_data", base=shared),
                parameters=parameters,
            )
        )
    return recipe
