"""Read a mergekit YAML recipe with this plugin's additions, check it strictly, and hand mergekit a clean copy.

Additions that only ``mergekit-fisher merge`` understands (mergekit itself would reject or ignore them):

* per model, ``parameters.calibration_data``: a data source (or a mapping ``{data: ..., <setting>: ...}``) to
  calibrate that model on when it has no ``fisher`` file;
* top level, ``calibration:``: shared :class:`~mergekit_fisher_mask.settings.CalibrationSettings`.

A :class:`Recipe` is immutable: filling in calibrated Fisher paths or a default base model returns a new one.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml
from mergekit.config import MergeConfiguration
from pydantic import ValidationError

from ..errors import RecipeError, SettingsError
from ..settings import CalibrationSettings, make_settings

PLUGIN_METHODS = ("fisher_mask", "fisher")
_TOP_LEVEL_KEYS = set(MergeConfiguration.model_fields) | {"calibration"}
_MODEL_KEYS = {"model", "parameters"}
_SLICE_SOURCE_KEYS = {"model", "parameters", "layer_range"}
_SLICE_KEYS = {"sources", "base_model", "residual_weight", "parameters"}

Location = Tuple[Any, ...]  # path of a model entry in the recipe: ("models", i) or ("slices", i, "sources", j)


@dataclass(frozen=True)
class CalibrationRequest:
    """A model to calibrate before the merge, and where its Fisher path goes in the recipe."""

    model: str
    data: str
    settings: CalibrationSettings
    location: Location


@dataclass(frozen=True)
class Recipe:
    """A checked recipe: what mergekit will see, the user's original text, and the calibrations it asks for."""

    _config: Dict[str, Any]
    source_text: str
    path: str
    calibrations: Tuple[CalibrationRequest, ...] = ()

    @property
    def config(self) -> Dict[str, Any]:
        """A copy of the mergekit configuration (without this plugin's keys)."""
        return copy.deepcopy(self._config)

    @property
    def method(self) -> str:
        return self._config["merge_method"]

    @property
    def base_model(self) -> Optional[str]:
        base = self._config.get("base_model")
        return str(base) if base else None

    def model_locations(self) -> List[Location]:
        """Where every input-model entry is (``models:`` items and slice sources), in recipe order."""
        return _locations(self._config)

    def entry(self, location: Location) -> Dict[str, Any]:
        """A copy of the model entry at ``location``."""
        return copy.deepcopy(_node(self._config, location))

    def model_references(self) -> List[str]:
        """Every merged model's reference, in recipe order (a model may appear in several slices)."""
        return [str(self.entry(location)["model"]) for location in self.model_locations()]

    def fisher_path(self, location: Location) -> Optional[str]:
        return (self.entry(location).get("parameters") or {}).get("fisher")

    def with_fisher_paths(self, paths: Mapping[Location, str]) -> "Recipe":
        """A new recipe with ``parameters.fisher`` set at the given model locations."""
        config = self.config
        for location, path in paths.items():
            _node(config, location).setdefault("parameters", {})["fisher"] = str(path)
        return replace(self, _config=config)

    def with_base_model(self, reference: str) -> "Recipe":
        return replace(self, _config={**self.config, "base_model": reference})

    def merge_configuration(self) -> MergeConfiguration:
        from mergekit.common import dtype_from_name

        for key in ("dtype", "out_dtype"):
            value = self.config.get(key)
            try:
                if value is not None:
                    dtype_from_name(value)
            except (RuntimeError, TypeError, AttributeError):
                raise RecipeError(f"{self.path}: {key}: unknown dtype {value!r}; use float32, bfloat16 or float16.") from None
        try:
            return MergeConfiguration.model_validate(self.config)
        except ValidationError as error:
            raise RecipeError(f"{self.path}: not a valid mergekit recipe: {_problems(error, locations=True)}.") from None
        except Exception as error:  # mergekit's own validators raise plain exceptions
            raise RecipeError(f"{self.path}: not a valid mergekit recipe: {error}") from error


def _recipe_settings(values: Mapping[str, Any], where: str) -> CalibrationSettings:
    try:
        return make_settings(values, where)
    except SettingsError as error:
        raise RecipeError(str(error)) from None


def _locations(config: Mapping[str, Any]) -> List[Location]:
    locations: List[Location] = [("models", i) for i in range(len(config.get("models") or []))]
    for i, output_slice in enumerate(config.get("slices") or []):
        locations += [("slices", i, "sources", j) for j in range(len(output_slice.get("sources") or []))]
    return locations


def _node(config: Mapping[str, Any], location: Location) -> Any:
    node: Any = config
    for key in location:
        node = node[key]
    return node


def _check_keys(found: Mapping, allowed: set, where: str) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}. Allowed: {', '.join(sorted(allowed))}.")


def _resolve(path_like: Any, base_dir: str, where: str) -> str:
    """Make a recipe-relative local path absolute; leave Hub ids and dataset names alone."""
    if not isinstance(path_like, str):
        raise RecipeError(f"{where}: expected a single path string, got {path_like!r} (filters are not supported here).")
    candidate = os.path.join(base_dir, os.path.expanduser(path_like))
    return os.path.abspath(candidate) if os.path.exists(candidate) else path_like


def _identity(reference: str, base_dir: str) -> str:
    """What makes two model references the same model: the resolved folder for local paths, else the Hub id."""
    candidate = os.path.join(base_dir, os.path.expanduser(reference))
    return os.path.realpath(candidate) if os.path.exists(candidate) else reference


def _method_parameters(method: str, path: str) -> dict:
    """A registered method's parameter specs by name (mergekit accepts each at top level, per slice and per model)."""
    from mergekit import merge_methods

    from .kernels import register

    register()
    try:
        spec = merge_methods.get(method).spec
    except RuntimeError:
        known = ", ".join(sorted(m.spec.name for m in merge_methods.registered_methods()))
        raise RecipeError(f"{path}: unknown merge_method {method!r}. Known methods: {known}.") from None
    return {parameter.name: parameter for parameter in spec.parameters}


def _problems(error: ValidationError, *, locations: bool = False) -> str:
    """pydantic's messages on one line (``loc: message; ...`` with ``locations``)."""
    return "; ".join(
        (f"{'.'.join(str(part) for part in item['loc'])}: " if locations else "") + item["msg"].removeprefix("Value error, ")
        for item in error.errors()
    )


def _check_values(parameters: Mapping[str, Any], specs: dict, where: str) -> None:
    """Validate plain scalar values now (filtered and gradient values are left to mergekit)."""
    for name, value in parameters.items():
        if name in specs and isinstance(value, (bool, int, float, str)):
            try:
                specs[name].validate(value)
            except ValidationError as error:
                raise RecipeError(f"{where}: {name}: {_problems(error)}, got {value!r}.") from None
            except Exception as error:  # mergekit's own validators raise plain exceptions
                raise RecipeError(f"{where}: {name}: {error}, got {value!r}.") from None


def _check_duplicates(groups: List[Tuple[str, List[str]]], base_dir: str) -> None:
    """Refuse a model listed twice in ``models:`` or in one slice's ``sources`` (mergekit fails deep inside)."""
    for where, references in groups:
        seen: Dict[str, str] = {}
        for reference in references:
            identity = _identity(reference, base_dir)
            if identity in seen:
                same = "" if seen[identity] == reference else f" (as {seen[identity]!r})"
                raise RecipeError(
                    f"{where}: model {reference!r} is listed twice{same}. List each model once; give it a larger "
                    "`weight` to count it more."
                )
            seen[identity] = reference


def load_recipe(path: str) -> Recipe:
    """Parse and check a recipe file; raise :class:`RecipeError` naming the file and the offending key."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error}).") from error
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
    # Validate every shared value early, even if no model needs it; whether placement options have the device_map
    # they need is checked per model, once its own settings are merged in.
    _recipe_settings({**shared, "device_map": shared.get("device_map") or "auto"}, f"{path}: calibration")
    base_dir = os.path.dirname(os.path.abspath(path))

    models = config.get("models") or []
    slices = config.get("slices") or []
    for index, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{path}: models[{index}] must be a mapping with a `model` key, got {entry!r}.")
        _check_keys(entry, _MODEL_KEYS, f"{path}: models[{index}]")
    for index, output_slice in enumerate(slices):
        _check_keys(output_slice, _SLICE_KEYS, f"{path}: slices[{index}]")
        for j, source in enumerate(output_slice.get("sources") or []):
            _check_keys(source, _SLICE_SOURCE_KEYS, f"{path}: slices[{index}].sources[{j}]")
    _check_duplicates(
        [(f"{path}: models", [str(e["model"]) for e in models])]
        + [(f"{path}: slices[{i}].sources", [str(e["model"]) for e in s.get("sources") or []]) for i, s in enumerate(slices)],
        base_dir,
    )

    specs = _method_parameters(config["merge_method"], path)
    allowed = set(specs)
    blocks = [(config.get("parameters") or {}, f"{path}: parameters", allowed)]
    blocks += [(s.get("parameters") or {}, f"{path}: slices[{i}].parameters", allowed) for i, s in enumerate(slices)]
    for location in _locations(config):  # calibration_data belongs to one model
        entry = _node(config, location)
        blocks.append((entry.get("parameters") or {}, f"{path}: model {entry['model']!r}: parameters", allowed | {"calibration_data"}))
    for parameters, where, names in blocks:
        _check_keys(parameters, names, where)
        _check_values(parameters, specs, where)

    fisher_paths, requests = {}, []
    for location in _locations(config):  # config is this loader's own copy until the Recipe is made
        entry = _node(config, location)
        where = f"{path}: model {entry['model']!r}"
        parameters = entry.get("parameters") or {}
        if "fisher" in parameters:
            fisher_paths[location] = _resolve(parameters["fisher"], base_dir, f"{where}: fisher")
        request = parameters.get("calibration_data")
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
        settings = _recipe_settings({**shared, **request}, f"{where}: calibration_data")
        requests.append(
            CalibrationRequest(str(entry["model"]), _resolve(data, base_dir, f"{where}: calibration_data"), settings, location)
        )
        del parameters["calibration_data"]
    return Recipe(config, text, path, tuple(requests)).with_fisher_paths(fisher_paths)
