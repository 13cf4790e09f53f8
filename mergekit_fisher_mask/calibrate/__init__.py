"""Calibration: measure the Fisher information of a model's mask nodes (or of every parameter) on data.

Layout: :mod:`.data` (examples and tokenization), :mod:`.losses` (per-example losses), :mod:`.masks` (the mask
hooks), :mod:`.placement` (dtype, device maps, offload, checkpointing), :mod:`.engine` (what both passes share),
:mod:`.mask_pass` and :mod:`.full_pass` (the two passes), :mod:`.api` (from a model folder to a Fisher file).

This package depends on the shared modules of ``mergekit_fisher_mask`` only; merging never imports it.
"""

from .api import (
    PreparedCalibration,
    calibrate,
    calibrate_full,
    effective_max_length,
    make_accelerator,
    prepare_calibration,
)
from .engine import autocast_context, check_estimator, frozen
from .full_pass import compute_full_fisher
from .losses import model_inputs
from .mask_pass import auto_micro_batch_size, compute_mask_fisher
from .placement import Placement

__all__ = [
    "Placement",
    "PreparedCalibration",
    "auto_micro_batch_size",
    "autocast_context",
    "calibrate",
    "calibrate_full",
    "check_estimator",
    "compute_full_fisher",
    "compute_mask_fisher",
    "effective_max_length",
    "frozen",
    "make_accelerator",
    "model_inputs",
    "prepare_calibration",
]
