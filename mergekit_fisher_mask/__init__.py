"""Fisher Mask Nodes merging (arXiv 2403.09891) as a mergekit plugin.

Importing this package registers the ``fisher_mask`` and ``fisher`` merge methods with mergekit (idempotently).

Layout (dependencies point down the list, never up):

* shared: :mod:`.errors`, :mod:`.architectures`, :mod:`.tasks`, :mod:`.settings`, :mod:`.checkpoints`,
  :mod:`.outputs`, :mod:`.files` (the Fisher file formats);
* :mod:`.calibrate` (measuring Fisher) and :mod:`.merge` (the merge methods, recipes), which never import each other;
* :mod:`.pipeline` (``merge`` with calibration on demand), :mod:`.inspection`, :mod:`.hub`, :mod:`.cli`.

Note: ``mergekit_fisher_mask.calibrate`` is the :func:`calibrate` function; import the subpackage's modules by their
full names (``from mergekit_fisher_mask.calibrate.data import ...``).
"""

from .architectures import ARCHITECTURES, NodeShape, get_architecture
from .calibrate.api import PreparedCalibration, calibrate, calibrate_full, prepare_calibration
from .calibrate.engine import autocast_context
from .calibrate.full_pass import compute_full_fisher
from .calibrate.losses import model_inputs
from .calibrate.mask_pass import compute_mask_fisher
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
from .files import FullFisherReader, MaskFisher, load_mask_fisher, save_mask_fisher
from .merge import (
    FISHER,
    FISHER_MASK,
    Normalize,
    Scheme,
    Sparsify,
    Uncovered,
    fisher_mask_merge,
    fisher_merge,
    register,
)
from .settings import Aggregate, CalibrationSettings, Estimator, LoadDtype, MixedPrecision
from .tasks import Loss, Task

__version__ = "0.2.0"

register()

__all__ = [
    "ARCHITECTURES",
    "Aggregate",
    "CalibrationDataError",
    "CalibrationSettings",
    "Estimator",
    "FISHER",
    "FISHER_MASK",
    "FisherFileError",
    "FisherMaskError",
    "FullFisherReader",
    "LoadDtype",
    "Loss",
    "MaskFisher",
    "MixedPrecision",
    "ModelLoadError",
    "NodeShape",
    "Normalize",
    "OutputPathError",
    "PreparedCalibration",
    "RecipeError",
    "Scheme",
    "SettingsError",
    "Sparsify",
    "Task",
    "Uncovered",
    "UnsupportedArchitectureError",
    "autocast_context",
    "calibrate",
    "calibrate_full",
    "compute_full_fisher",
    "compute_mask_fisher",
    "fisher_mask_merge",
    "fisher_merge",
    "get_architecture",
    "load_mask_fisher",
    "model_inputs",
    "prepare_calibration",
    "register",
    "save_mask_fisher",
]
