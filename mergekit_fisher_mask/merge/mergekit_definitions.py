"""Architecture definitions this plugin gives mergekit, through mergekit's own registry of JSON definitions.

mergekit 0.1.5 chooses a model's definition by ``config.architectures[0]`` in
``mergekit.architecture.json_definitions.NAME_TO_ARCH`` (``arch_info_for_config``, mergekit/architecture/__init__.py
lines 52-60), which it fills from the JSON files in ``mergekit/_data/architectures``. The plugin adds to that
registry the same way, and nothing of mergekit's code is replaced:

* **corrected definitions** (:data:`CORRECTIONS`, JSON files beside this module): GPT-NeoX causal LMs, whose
  mergekit definition lists attention buffers (``attention.bias``, ``masked_bias``, ``rotary_emb.inv_freq``) that
  transformers 5 no longer saves, so mergekit refuses every Pythia checkpoint. Registered once, at import;
* **definitions without a model's task head** (:func:`without_weights`): for classifiers whose heads differ in
  shape. Each is registered under a name of its own, derived from what it hides, and a merge selects it through
  mergekit's ``ModelReference.override_architecture``; definitions of other merges are never touched, so merges in
  one process do not interfere.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from typing import Iterable, List

from mergekit.architecture import ModelArchitecture, ModuleArchitecture, ModuleDefinition, get_architecture_info
from mergekit.architecture.json_definitions import NAME_TO_ARCH, JsonModuleArchDef, JsonModuleArchitecture

CORRECTIONS = ("gpt-neox.json",)  # in mergekit_fisher_mask/merge/definitions/
_DEFINITIONS = "mergekit_fisher_mask.merge.definitions"


def _from_json(text: str) -> ModelArchitecture:
    module = JsonModuleArchitecture(definition=JsonModuleArchDef.model_validate(json.loads(text)))
    return ModelArchitecture(
        modules={"default": ModuleDefinition(architecture=module)},
        architectures=module.definition.architectures,
        model_type=module.definition.expected_model_type,
    )


def register_corrections() -> None:
    """Put the corrected definitions in mergekit's registry in place of its own (idempotent)."""
    for name in CORRECTIONS:
        corrected = _from_json((importlib.resources.files(_DEFINITIONS) / name).read_text())
        for architecture in corrected.architectures:
            NAME_TO_ARCH[architecture] = [corrected]


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


def without_weights(merge_config, options, hidden: List[str], config) -> str:
    """Register the definition mergekit would use for ``merge_config``, minus the weights ``hidden``, and return
    the architecture name to give each model as ``override_architecture`` (``config``: the base model's)."""
    info = get_architecture_info(merge_config, options)
    architecture = config.architectures[0]
    digest = hashlib.sha256(json.dumps([architecture, info.model_dump_json(), sorted(hidden)]).encode()).hexdigest()[:12]
    name = f"{architecture}__mergekit_fisher_without_{digest}"
    if name not in NAME_TO_ARCH:
        modules = {
            key: ModuleDefinition(architecture=_WithoutWeights(module.architecture, hidden),
                                  weight_prefix=module.weight_prefix, subfolder=module.subfolder)
            for key, module in info.modules.items()
        }
        NAME_TO_ARCH[name] = [info.model_copy(update={"modules": modules, "architectures": [name]})]
    return name


def planned_names(merge_config, options, config) -> set:
    """Every tensor name mergekit's plan for this recipe writes or reads (names, aliases and tied names)."""
    names: set = set()
    for weight in get_architecture_info(merge_config, options).all_weights(config):
        names.update([weight.name, *(weight.aliases or ()), *(weight.tied_names or ())])
    return names
