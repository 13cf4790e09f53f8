"""The merge methods this plugin adds to mergekit, as one table: what each reads per model and how the model card
describes it. The recipe checks, the pipeline and the model card all read this table, so a new method is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from mergekit import merge_methods

from ..files import FullFisher, GramStats, MaskFisher
from .kernels import FISHER, FISHER_MASK
from .mergekit_definitions import register_corrections
from .regmean import REGMEAN


@dataclass(frozen=True)
class PluginMethod:
    """A registered merge method of this plugin and the statistic file it reads for every model."""

    method: object  # mergekit's merge method (``merge_method(...)``)
    statistic: type  # the record type (file format) of :mod:`mergekit_fisher_mask.files` it reads
    parameter: str  # the per-model recipe parameter that names that file
    summary: str  # one sentence for the model card, after the method's name and link

    @property
    def name(self) -> str:
        return self.method.spec.name

    def card_text(self) -> str:
        spec = self.method.spec
        return f"[{spec.pretty_name}]({spec.reference_url}): {self.summary}"


PLUGIN_METHODS: Dict[str, PluginMethod] = {
    entry.name: entry
    for entry in (
        PluginMethod(
            FISHER_MASK, MaskFisher, "fisher",
            "each model's parameters are weighted by the Fisher information of the attention-head and FFN-neuron "
            "mask nodes that scale them, `theta = sum_k l_k F_k theta_k / sum_k l_k F_k`.",
        ),
        PluginMethod(
            FISHER, FullFisher, "fisher",
            "every parameter is weighted by its own diagonal Fisher information (Matena & Raffel).",
        ),
        PluginMethod(
            REGMEAN, GramStats, "gram",
            "each linear layer is the least-squares fit to every model's outputs on its own data, from the Gram "
            "matrices of the layer's inputs (Jin et al., ICLR 2023).",
        ),
    )
}


def register() -> None:
    """Register this package's merge methods (and its corrected architecture definitions) with mergekit; calling
    it again is a no-op."""
    register_corrections()
    known = {method.spec.name for method in merge_methods.registered_methods()}
    for entry in PLUGIN_METHODS.values():
        if entry.name not in known:
            merge_methods.register(entry.method)
