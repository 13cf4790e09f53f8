"""Calibration: measure a statistic of a model on data (the mask Fisher of its nodes, the full Fisher, or RegMean's
Gram matrices).

Layout: :mod:`.data` (examples and tokenization), :mod:`.losses` (per-example losses), :mod:`.masks` (the mask
hooks), :mod:`.placement` (dtype, device maps, offload, checkpointing), :mod:`.engine` (what every pass shares),
:mod:`.mask_pass`, :mod:`.full_pass` and :mod:`.gram_pass` (the passes), :mod:`.api` (plan, load, measure, write).

This package depends on the shared modules of ``mergekit_fisher_mask`` only; merging never imports it. It was
called ``calibrate`` before 0.3; ``mergekit_fisher_mask.calibrate.*`` still imports these modules.
"""

from ..settings import check_estimator
from .api import (
    JOINT_PASSES,
    PASSES,
    CalibrationPlan,
    calibrate,
    calibrate_full,
    calibrate_gram,
    effective_max_length,
    load_calibration,
    make_accelerator,
    measure_statistic,
    measure_statistics,
    placed_model,
    plan_calibration,
    prepare_calibration,
)
from .engine import CalibrationPass, PassContext, PreparedCalibration, autocast_context, frozen
from .full_pass import compute_full_fisher
from .gram_pass import GramInputs, compute_gram
from .losses import model_inputs
from .mask_pass import auto_micro_batch_size, compute_mask_fisher, micro_batch_sizer
from .placement import Placement

__all__ = [
    "JOINT_PASSES",
    "PASSES",
    "CalibrationPass",
    "CalibrationPlan",
    "GramInputs",
    "PassContext",
    "Placement",
    "PreparedCalibration",
    "auto_micro_batch_size",
    "autocast_context",
    "calibrate",
    "calibrate_full",
    "calibrate_gram",
    "check_estimator",
    "compute_full_fisher",
    "compute_gram",
    "compute_mask_fisher",
    "effective_max_length",
    "frozen",
    "load_calibration",
    "make_accelerator",
    "measure_statistic",
    "measure_statistics",
    "micro_batch_sizer",
    "placed_model",
    "model_inputs",
    "plan_calibration",
    "prepare_calibration",
]
