"""The statistic file formats, read and written by both calibration and merging; each record type owns its format
(``save``, ``read``, ``metadata``, ``check_matches_model``), with the provenance they share in :mod:`.base`.

* :mod:`.mask`: one small safetensors file per model, one tensor per node group (``head_fisher`` [L, H],
  ``ffn_fisher`` [L, D], ``expert_fisher`` [L, E, I], T5's per-stack groups);
* :mod:`.full`: a folder with one Fisher tensor per parameter, sharded like the model;
* :mod:`.gram`: RegMean's folder of Gram matrices, one per linear layer input.
"""

from .base import Measured
from .full import FULL_FORMAT, INDEX_NAME, FullFisher, FullFisherReader, is_full_fisher_dir
from .gram import GRAM_FORMAT, GRAM_INDEX, GramInput, GramStats
from .mask import FORMAT, MaskFisher, check_matches_model, is_mask_fisher_file, load_mask_fisher, save_mask_fisher

__all__ = [
    "FORMAT",
    "FULL_FORMAT",
    "FullFisher",
    "FullFisherReader",
    "GRAM_FORMAT",
    "GRAM_INDEX",
    "GramInput",
    "GramStats",
    "INDEX_NAME",
    "MaskFisher",
    "Measured",
    "check_matches_model",
    "is_full_fisher_dir",
    "is_mask_fisher_file",
    "load_mask_fisher",
    "save_mask_fisher",
]
