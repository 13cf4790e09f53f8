"""The Fisher file formats, read and written by both calibration and merging.

* :mod:`.mask`: one small safetensors file per model, one tensor per node group (``head_fisher`` [L, H],
  ``ffn_fisher`` [L, D], ``expert_fisher`` [L, E, I], T5's per-stack groups);
* :mod:`.full`: a folder with one Fisher tensor per parameter, sharded like the model.
"""

from .full import FULL_FORMAT, INDEX_NAME, FullFisherReader, is_full_fisher_dir, save_full_fisher
from .mask import FORMAT, MaskFisher, check_matches_model, is_mask_fisher_file, load_mask_fisher, save_mask_fisher

__all__ = [
    "FORMAT",
    "FULL_FORMAT",
    "FullFisherReader",
    "INDEX_NAME",
    "MaskFisher",
    "check_matches_model",
    "is_full_fisher_dir",
    "is_mask_fisher_file",
    "load_mask_fisher",
    "save_full_fisher",
    "save_mask_fisher",
]
