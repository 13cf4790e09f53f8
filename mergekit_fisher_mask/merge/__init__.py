"""Merging: the plugin's merge methods, recipes, task heads and the model card.

Layout: :mod:`.expand` (node Fisher to per-tensor weights), :mod:`.sparsify` (Fisher-weighted task vectors),
:mod:`.kernels` (``fisher_mask`` and ``fisher``), :mod:`.regmean` (``regmean``), :mod:`.methods` (the table of registered methods),
:mod:`.recipe` (YAML recipes and their checks against the models), :mod:`.task_heads` (classifier heads of
different shapes), :mod:`.mergekit_definitions` (architecture definitions the plugin gives mergekit),
:mod:`.model_card`.

This package depends on the shared modules of ``mergekit_fisher_mask`` only; it never imports calibration.
"""

from .expand import Normalize, Scheme
from .kernels import FISHER, FISHER_MASK, Uncovered, fisher_mask_merge, fisher_merge
from .methods import PLUGIN_METHODS, PluginMethod, register
from .recipe import Recipe, load_recipe
from .regmean import REGMEAN, Nonlinear, regmean_merge
from .sparsify import Sparsify

__all__ = [
    "FISHER",
    "FISHER_MASK",
    "Nonlinear",
    "Normalize",
    "PLUGIN_METHODS",
    "PluginMethod",
    "REGMEAN",
    "Recipe",
    "Scheme",
    "Sparsify",
    "Uncovered",
    "fisher_mask_merge",
    "fisher_merge",
    "load_recipe",
    "register",
    "regmean_merge",
]
