"""Read a mergekit YAML recipe with this plugin's additions, check it strictly, and hand mergekit a clean copy.

Additions that only ``mergekit-fisher merge`` understands (mergekit itself would reject or ignore them):

* per model, ``parameters.calibration_data``: a data source (or a mapping ``{data: ..., <setting>: ...}``) to
  calibrate that model on when it has no statistic file (``fisher``);
* top level, ``calibration:``: shared :class:`~mergekit_fisher_mask.settings.CalibrationSettings`.

Path rules (one each, used for loading and for every check):

* model paths (``model``, ``base_model``) are resolved against the **current folder**, as mergekit loads them; a
  path that exists only relative to the recipe's folder is refused with a "did you mean";
* statistic files and ``calibration_data`` files are resolved against the **recipe's folder**, or else the current
  folder; ``~`` is expanded in every path.

mergekit receives local model paths as absolute paths, so what it loads is what was checked.
A :class:`Recipe` is immutable: filling in calibrated paths or a default base model returns a new one.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml
from mergekit.config import MergeConfiguration
from pydantic import ValidationError

from ..architectures import NodeShape
from ..errors import RecipeError, SettingsError
from ..paths import looks_local, user_path
from ..settings import CalibrationSettings, make_settings
from .methods import PLUGIN_METHODS

LOG = logging.getLogger(__name__)

_TOP_LEVEL_KEYS = set(MergeConfiguration.model_fields) | {"calibration"}
_MODEL_KEYS = {"model", "parameters"}
_SLICE_SOURCE_KEYS = {"model", "parameters", "layer_range"}
_SLICE_KEYS = {"sources", "base_model", "residual_weight", "parameters"}
# Shared parameters of fisher_mask that merge task vectors over the base model: they need an explicit base_model.
_NEEDS_BASE = {"sparsify": lambda value: value not in (None, "none"), "uncovered": lambda value: value == "base",
               "nonlinear": lambda value: value == "base", "scale": lambda value: value != 1}

Location = Tuple[Any, ...]  # path of a model entry in the recipe: ("models", i) or ("slices", i, "sources", j)


@dataclass(frozen=True)
class CalibrationRequest:
    """A model to calibrate before the merge, and where its statistic file's path goes in the recipe."""

    model: str
    data: str
    settings: CalibrationSettings
    location: Location


def local_model(reference: str) -> Optional[Path]:
    """The folder a model reference names on this machine (resolved against the current folder), or None for a
    reference that is not a local folder (a Hub id)."""
    path = user_path(reference)
    return path if path.is_dir() else None


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
    def plugin(self):
        """This plugin's :class:`~.methods.PluginMethod` for the recipe's method, or None for mergekit's own."""
        return PLUGIN_METHODS.get(self.method)

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

    def statistic_path(self, location: Location) -> Optional[str]:
        """The statistic file (``fisher``, ...) the recipe gives the model at ``location``."""
        parameter = self.plugin.parameter if self.plugin else "fisher"
        return (self.entry(location).get("parameters") or {}).get(parameter)

    fisher_path = statistic_path  # the name before RegMean's Gram files

    def with_statistic_paths(self, paths: Mapping[Location, str]) -> "Recipe":
        """A new recipe with the method's statistic parameter set at the given model locations."""
        parameter = self.plugin.parameter if self.plugin else "fisher"
        config = self.config
        for location, path in paths.items():
            _node(config, location).setdefault("parameters", {})[parameter] = str(path)
        return replace(self, _config=config)

    with_fisher_paths = with_statistic_paths

    def with_base_model(self, reference: str) -> "Recipe":
        return replace(self, _config={**self.config, "base_model": reference})

    def merge_configuration(self, override_architecture: Optional[str] = None) -> MergeConfiguration:
        """The configuration mergekit runs: local model paths made absolute (so mergekit loads what was checked)
        and, if given, every model read through the architecture definition ``override_architecture``."""
        from mergekit.common import dtype_from_name

        config = self.config
        for key in ("dtype", "out_dtype"):
            value = config.get(key)
            try:
                if value is not None:
                    dtype_from_name(value)
            except (RuntimeError, TypeError, AttributeError):
                raise RecipeError(f"{self.path}: {key}: unknown dtype {value!r}; use float32, bfloat16 or float16.") from None

        def reference(value):
            folder = local_model(str(value))
            model = str(folder) if folder is not None else value
            return {"model": model, "override_architecture": override_architecture} if override_architecture else model

        for location in _locations(config):
            _node(config, location)["model"] = reference(_node(config, location)["model"])
        for owner in [config] + list(config.get("slices") or []):
            if owner.get("base_model"):
                owner["base_model"] = reference(owner["base_model"])
        if config.get("tokenizer_source") not in (None, "union", "base"):
            config["tokenizer_source"] = reference(config["tokenizer_source"])
        try:
            return MergeConfiguration.model_validate(config)
        except ValidationError as error:
            raise RecipeError(f"{self.path}: not a valid mergekit recipe: {_problems(error, locations=True)}.") from None
        except Exception as error:  # mergekit's own validators raise plain exceptions
            raise RecipeError(f"{self.path}: not a valid mergekit recipe: {error}") from error

    # ---- checks of the recipe against the models it names ----------------------------------------------------

    def check_shapes(self, configs: Mapping[str, Any]) -> None:
        """All merged models must be supported and share one node layout and vocabulary size; ``configs`` maps
        each model reference to its HF config."""
        shapes = {}
        for ref in self.model_references():
            config = configs[ref]
            shapes[ref] = (NodeShape.from_config(config, where=f"model {ref}"), config.vocab_size)
        first_ref, first = next(iter(shapes.items()))
        for ref, shape in shapes.items():
            if shape != first:
                raise RecipeError(
                    f"Models {first_ref} and {ref} have different shapes ({first[0]}, vocab {first[1]} vs "
                    f"{shape[0]}, vocab {shape[1]}); {self.method} merges models of one architecture and size."
                )

    def check_slices(self) -> None:
        """The plugin's kernels read the layer index from the output tensor name, so every slice must map layers
        1:1 onto the output."""
        position = 0
        for index, output_slice in enumerate(self._config.get("slices") or []):
            ranges = {tuple(source.get("layer_range", ())) for source in output_slice.get("sources") or []}
            if len(ranges) != 1 or next(iter(ranges))[0] != position:
                raise RecipeError(
                    f"{self.path}: slices[{index}] takes layers {sorted(ranges)} into output layers starting at "
                    f"{position}. {self.method} needs every source to use the same layer_range, in order, without "
                    "shifting layers (e.g. one slice with layer_range [0, num_layers])."
                )
            position = next(iter(ranges))[1]


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


def _resolve(path_like: Any, base_dir: Path, where: str) -> str:
    """A recipe-relative local path made absolute (else one relative to the current folder, if it exists there);
    Hub ids and dataset names are left alone."""
    if not isinstance(path_like, str):
        raise RecipeError(f"{where}: expected a single path string, got {path_like!r} (filters are not supported here).")
    expanded = user_path(path_like) if path_like.startswith("~") else None
    for candidate in filter(None, (expanded, base_dir / path_like, user_path(path_like))):
        if os.path.exists(candidate):
            return str(candidate)
    return str(expanded) if expanded else path_like


def _check_model_path(reference: str, base_dir: Path, where: str) -> None:
    """Refuse a model path that is not a folder here, saying how model paths are resolved."""
    if local_model(reference) is not None:
        return
    cwd = Path.cwd()
    beside_recipe = base_dir / reference
    if beside_recipe.is_dir() and not reference.startswith(("/", "~")):
        raise RecipeError(
            f"{where}: model {reference!r} is not a folder here: model paths are resolved against the current folder "
            f"{cwd}, as mergekit loads them. Did you mean {beside_recipe}? Write that path, or run from {base_dir}."
        )
    if looks_local(reference) or os.path.exists(user_path(reference)):
        what = "is a file, not a model folder" if user_path(reference).is_file() else "does not exist"
        raise RecipeError(
            f"{where}: model {reference!r} {what} ({user_path(reference)}; model paths are resolved against the "
            f"current folder {cwd}). Give the folder that holds config.json and the weights."
        )


def _identity(reference: str) -> str:
    """What makes two model references the same model: the real folder for local paths, else the Hub id."""
    folder = local_model(reference)
    return os.path.realpath(folder) if folder is not None else reference


def _method_parameters(method: str, path: str) -> dict:
    """A registered method's parameter specs by name (mergekit accepts each at top level, per slice and per model)."""
    from mergekit import merge_methods

    from .methods import register

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


def _check_duplicates(groups: List[Tuple[str, List[str]]]) -> None:
    """Refuse a model listed twice in ``models:`` or in one slice's ``sources`` (mergekit fails deep inside)."""
    for where, references in groups:
        seen: Dict[str, str] = {}
        for reference in references:
            identity = _identity(reference)
            if identity in seen:
                same = "" if seen[identity] == reference else f" (as {seen[identity]!r})"
                raise RecipeError(
                    f"{where}: model {reference!r} is listed twice{same}. List each model once; give it a larger "
                    "`weight` to count it more."
                )
            seen[identity] = reference


_PER_MODEL_SCOPES = ("input", "non_base")  # mergekit's ParameterScope values read per model


def _check_shared_not_per_model(parameters: Mapping[str, Any], shared: set, where: str) -> None:
    """mergekit reads a shared parameter (``alpha``, ``scheme``, ``density``, ...) from the top-level or a slice's
    ``parameters`` only; given per model it would be silently ignored."""
    misplaced = sorted(set(parameters) & shared)
    if misplaced:
        raise RecipeError(
            f"{where}: {', '.join(misplaced)} {'is' if len(misplaced) == 1 else 'are'} shared by every model, and mergekit "
            "reads shared parameters from the top-level `parameters:` (or a slice's) only. Move "
            f"{'it' if len(misplaced) == 1 else 'them'} there."
        )


def _check_required(config: Mapping[str, Any], specs: dict, method: str, path: str) -> None:
    """Every model needs each required per-model parameter (e.g. linear's ``weight``), given for it or once for all."""
    required = [name for name, spec in specs.items() if spec.required and spec.scope.value in _PER_MODEL_SCOPES]
    shared = dict(config.get("parameters") or {})
    base = str(config.get("base_model")) if config.get("base_model") else None
    for location in _locations(config):
        entry = _node(config, location)
        given = {**shared, **((_node(config, location[:2]).get("parameters") or {}) if location[0] == "slices" else {}),
                 **(entry.get("parameters") or {})}
        for name in required:
            if name in given or specs[name].scope.value == "non_base" and str(entry["model"]) == base:
                continue
            raise RecipeError(
                f"{path}: {method} needs `{name}` for every model, and model {entry['model']!r} has none. Give it "
                f"(`parameters: {{{name}: 1.0}}`), or once for all models under the top-level `parameters:`."
            )


def _check_base_model_needed(config: Mapping[str, Any], path: str) -> None:
    """Task vectors are changes from the base model: refuse options that use them without an explicit base."""
    if config.get("base_model"):
        return
    blocks = [config.get("parameters") or {}] + [s.get("parameters") or {} for s in config.get("slices") or []]
    for parameters in blocks:
        for name, needs in _NEEDS_BASE.items():
            if name in parameters and needs(parameters[name]):
                raise RecipeError(
                    f"{path}: {name}: {parameters[name]} works on the models' changes from a base model, and the "
                    "recipe has no base_model. Add `base_model:` (the model the others were fine-tuned from)."
                )


def load_recipe(path) -> Recipe:
    """Parse and check a recipe file; raise :class:`RecipeError` naming the file and the offending key."""
    path = user_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error}).") from error
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error}).") from error
    if not isinstance(raw, dict) or "merge_method" not in raw:
        raise RecipeError(f"{path}: a recipe is a mapping with at least `merge_method` and `models` (or `slices`).")
    _check_keys(raw, _TOP_LEVEL_KEYS, str(path))
    config = copy.deepcopy(raw)
    shared = config.pop("calibration", None) or {}
    if not isinstance(shared, dict):
        raise RecipeError(f"{path}: `calibration` must be a mapping of settings, got {shared!r}.")
    # Validate every shared value early, even if no model needs it; whether placement options have the device_map
    # they need is checked per model, once its own settings are merged in.
    _recipe_settings({**shared, "device_map": shared.get("device_map") or "auto"}, f"{path}: calibration")
    base_dir = path.parent

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
        + [(f"{path}: slices[{i}].sources", [str(e["model"]) for e in s.get("sources") or []]) for i, s in enumerate(slices)]
    )
    references = [str(_node(config, location)["model"]) for location in _locations(config)]
    references += [str(o["base_model"]) for o in [config] + list(slices) if o.get("base_model")]
    for reference in dict.fromkeys(references):
        _check_model_path(reference, base_dir, str(path))

    method = config["merge_method"]
    specs = _method_parameters(method, str(path))
    parameter = PLUGIN_METHODS[method].parameter if method in PLUGIN_METHODS else None
    allowed = set(specs)
    per_model = {name for name, spec in specs.items() if spec.scope.value in _PER_MODEL_SCOPES}
    blocks = [(config.get("parameters") or {}, f"{path}: parameters", allowed)]
    blocks += [(s.get("parameters") or {}, f"{path}: slices[{i}].parameters", allowed) for i, s in enumerate(slices)]
    for location in _locations(config):  # calibration_data belongs to one model
        entry = _node(config, location)
        where = f"{path}: model {entry['model']!r}: parameters"
        _check_shared_not_per_model(entry.get("parameters") or {}, set(specs) - per_model, where)
        blocks.append((entry.get("parameters") or {}, where, per_model | {"calibration_data"}))
    for parameters, where, names in blocks:
        _check_keys(parameters, names, where)
        _check_values(parameters, specs, where)
    _check_required(config, specs, method, str(path))
    if method in PLUGIN_METHODS:
        _check_base_model_needed(config, str(path))

    statistic_paths, requests = {}, []
    for location in _locations(config):  # config is this loader's own copy until the Recipe is made
        entry = _node(config, location)
        where = f"{path}: model {entry['model']!r}"
        parameters = entry.get("parameters") or {}
        if parameter and parameter in parameters:
            statistic_paths[location] = _resolve(parameters[parameter], base_dir, f"{where}: {parameter}")
        request = parameters.get("calibration_data")
        if request is None:
            continue
        if parameter is None:
            plugin = ", ".join(PLUGIN_METHODS)
            raise RecipeError(f"{path}: calibration_data is only used by {plugin}; merge_method is {method}.")
        if parameter in parameters:
            raise RecipeError(f"{where}: give either `{parameter}` or `calibration_data`, not both.")
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
    if shared and not requests:
        LOG.warning("%s: the `calibration:` block is not used: no model has `calibration_data` to calibrate on.", path)
    return Recipe(config, text, str(path), tuple(requests)).with_statistic_paths(statistic_paths)
