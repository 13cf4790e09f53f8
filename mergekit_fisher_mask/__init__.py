"""Fisher Mask Nodes merging (arXiv 2403.09891) as a mergekit plugin.

Importing this package registers the ``fisher_mask`` merge method with mergekit (idempotently).
"""

from .architectures import ARCHITECTURES, NodeShape, get_architecture
from .calibration import CalibrationSettings, calibrate, compute_mask_fisher
from .errors import (
    CalibrationDataError,
    FisherFileError,
    FisherMaskError,
    RecipeError,
    UnsupportedArchitectureError,
)
from .fisher_file import MaskFisher, load_mask_fisher, save_mask_fisher
from .merge_kernel import FISHER_MASK, fisher_mask_merge, register

__version__ = "0.1.0"

register()

__all__ = [
    "ARCHITECTURES",
    "CalibrationDataError",
    "CalibrationSettings",
    "FISHER_MASK",
    "FisherFileError",
    "FisherMaskError",
    "MaskFisher",
    "NodeShape",
    "RecipeError",
    "UnsupportedArchitectureError",
    "calibrate",
    "compute_mask_fisher",
    "fisher_mask_merge",
    "get_architecture",
    "load_mask_fisher",
    "register",
    "save_mask_fisher",
]
