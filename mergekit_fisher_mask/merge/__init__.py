"""Merging: the ``fisher_mask`` and ``fisher`` merge methods, recipes, task heads and the model card.

Layout: :mod:`.expand` (node Fisher to per-tensor weights), :mod:`.sparsify` (Fisher-weighted task vectors),
:mod:`.kernels` (the registered methods),
:mod:`.recipe` (YAML recipes), :mod:`.heads` (task heads of different shapes), :mod:`.model_card`.

This package depends on the shared modules of ``mergekit_fisher_mask`` only; it never imports calibration.
"""

from .expand import Normalize, Scheme
from .kernels import FISHER, FISHER_MASK, Uncovered, fisher_mask_merge, fisher_merge, register
from .recipe import Recipe, load_recipe
from .sparsify import Sparsify

__all__ = [
    "FISHER",
    "FISHER_MASK",
    "Normalize",
    "Recipe",
    "Scheme",
    "Sparsify",
    "Uncovered",
    "fisher_mask_merge",
    "fisher_merge",
    "load_recipe",
    "register",
]
