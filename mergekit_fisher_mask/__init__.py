"""Fisher Mask Nodes merging (arXiv 2403.09891) as a mergekit plugin.

Importing this package registers the ``fisher_mask``, ``fisher`` and ``regmean`` merge methods with mergekit
(idempotently).

Layout (dependencies point down the list, never up):

* shared: :mod:`.errors`, :mod:`.paths`, :mod:`.architectures`, :mod:`.tasks`, :mod:`.settings`,
  :mod:`.checkpoints`, :mod:`.outputs` (everything that writes), :mod:`.files` (the statistic file formats);
* :mod:`.calibration` (measuring statistics) and :mod:`.merge` (the merge methods, recipes), which never import
  each other;
* :mod:`.cache` (calibration on demand), :mod:`.pipeline` (``merge``), :mod:`.inspection`, :mod:`.hub`, :mod:`.cli`.

``mergekit_fisher_mask.calibrate`` is the :func:`calibrate` function; the calibration modules are
``mergekit_fisher_mask.calibration.*`` (``mergekit_fisher_mask.calibrate.*`` still imports them, as before 0.3).
"""

from ._startup import quiet_interrupts

with quiet_interrupts():  # the imports below take seconds; Ctrl-C meanwhile ends the command quietly
    from . import _compat
    from .architectures import ARCHITECTURES, NodeShape, get_architecture
    from .calibration.api import (
        CalibrationPlan,
        PreparedCalibration,
        calibrate,
        calibrate_full,
        calibrate_gram,
        load_calibration,
        placed_model,
        plan_calibration,
        prepare_calibration,
    )
    from .calibration.full_pass import compute_full_fisher
    from .calibration.gram_pass import compute_gram
    from .calibration.mask_pass import compute_mask_fisher
    from .errors import (
        CalibrationDataError,
        FisherFileError,
        FisherMaskError,
        ModelLoadError,
        OutputPathError,
        RecipeError,
        SettingsError,
        UnsupportedArchitectureError,
    )
    from .files import FullFisher, FullFisherReader, GramStats, MaskFisher, load_mask_fisher, save_mask_fisher
    from .merge import (
        FISHER,
        FISHER_MASK,
        PLUGIN_METHODS,
        REGMEAN,
        Nonlinear,
        Normalize,
        Scheme,
        Sparsify,
        Uncovered,
        fisher_mask_merge,
        fisher_merge,
        register,
        regmean_merge,
    )
    from .settings import Aggregate, CalibrationSettings, Estimator, LoadDtype, MixedPrecision
    from .tasks import Loss, Task

    __version__ = "0.3.0"

    register()
    _compat.alias_renamed_modules()

__all__ = [
    "ARCHITECTURES",
    "Aggregate",
    "CalibrationDataError",
    "CalibrationPlan",
    "CalibrationSettings",
    "Estimator",
    "FISHER",
    "FISHER_MASK",
    "FisherFileError",
    "FisherMaskError",
    "FullFisher",
    "FullFisherReader",
    "GramStats",
    "LoadDtype",
    "Loss",
    "MaskFisher",
    "MixedPrecision",
    "ModelLoadError",
    "NodeShape",
    "Nonlinear",
    "Normalize",
    "OutputPathError",
    "PLUGIN_METHODS",
    "PreparedCalibration",
    "REGMEAN",
    "RecipeError",
    "Scheme",
    "SettingsError",
    "Sparsify",
    "Task",
    "Uncovered",
    "UnsupportedArchitectureError",
    "calibrate",
    "calibrate_full",
    "calibrate_gram",
    "compute_full_fisher",
    "compute_gram",
    "compute_mask_fisher",
    "fisher_mask_merge",
    "fisher_merge",
    "get_architecture",
    "load_calibration",
    "load_mask_fisher",
    "placed_model",
    "plan_calibration",
    "prepare_calibration",
    "register",
    "regmean_merge",
    "save_mask_fisher",
]
