"""Import paths of 0.2 keep working after the 0.3 restructure (calibrate/ -> calibration/, merge/heads.py ->
merge/task_heads.py), without hiding the package's ``calibrate`` function."""

from __future__ import annotations

import importlib

import pytest

import mergekit_fisher_mask

OLD_MODULES = [
    "mergekit_fisher_mask.calibrate.api", "mergekit_fisher_mask.calibrate.data", "mergekit_fisher_mask.calibrate.engine",
    "mergekit_fisher_mask.calibrate.full_pass", "mergekit_fisher_mask.calibrate.losses",
    "mergekit_fisher_mask.calibrate.mask_pass", "mergekit_fisher_mask.calibrate.masks",
    "mergekit_fisher_mask.calibrate.placement", "mergekit_fisher_mask.merge.heads", "mergekit_fisher_mask.files.mask",
    "mergekit_fisher_mask.files.full", "mergekit_fisher_mask.pipeline", "mergekit_fisher_mask.inspection",
]
# name -> module it was importable from in 0.2
OLD_NAMES = {
    "mergekit_fisher_mask": ["ARCHITECTURES", "Aggregate", "CalibrationDataError", "CalibrationSettings", "Estimator",
                             "FISHER", "FISHER_MASK", "FisherFileError", "FisherMaskError", "FullFisherReader",
                             "LoadDtype", "Loss", "MaskFisher", "MixedPrecision", "ModelLoadError", "NodeShape",
                             "Normalize", "OutputPathError", "PreparedCalibration", "RecipeError", "Scheme",
                             "SettingsError", "Sparsify", "Task", "Uncovered", "UnsupportedArchitectureError",
                             "calibrate", "calibrate_full", "compute_full_fisher", "compute_mask_fisher",
                             "fisher_mask_merge", "fisher_merge", "get_architecture", "load_mask_fisher",
                             "prepare_calibration", "register", "save_mask_fisher"],
    "mergekit_fisher_mask.calibrate": ["Placement", "PreparedCalibration", "auto_micro_batch_size", "autocast_context",
                                       "calibrate", "calibrate_full", "check_estimator", "compute_full_fisher",
                                       "compute_mask_fisher", "effective_max_length", "frozen", "make_accelerator",
                                       "model_inputs", "prepare_calibration"],
    "mergekit_fisher_mask.calibrate.data": ["select_examples", "load_rows", "CalibrationDataset", "encode_labels",
                                            "prepare_tokenizer"],
    "mergekit_fisher_mask.calibrate.losses": ["causal_lm_losses", "model_inputs"],
    "mergekit_fisher_mask.calibrate.engine": ["autocast_context", "frozen"],
    "mergekit_fisher_mask.files": ["FORMAT", "FULL_FORMAT", "FullFisherReader", "INDEX_NAME", "MaskFisher",
                                   "check_matches_model", "is_full_fisher_dir", "is_mask_fisher_file",
                                   "load_mask_fisher", "save_mask_fisher"],
    "mergekit_fisher_mask.merge": ["FISHER", "FISHER_MASK", "Normalize", "Recipe", "Scheme", "Sparsify", "Uncovered",
                                   "fisher_mask_merge", "fisher_merge", "load_recipe", "register"],
    "mergekit_fisher_mask.merge.heads": ["copy_task_head", "planned_names", "task_head_tensors"],
    "mergekit_fisher_mask.pipeline": ["HEAD_POLICIES", "InputModel", "MARKER", "calibration_cache_key",
                                      "default_cache_dir", "foreign_files", "is_merge_output", "run_fisher_merge"],
}


@pytest.mark.parametrize("module", OLD_MODULES)
def test_old_module_paths_import(module):
    assert importlib.import_module(module) is not None


@pytest.mark.parametrize("module, names", sorted(OLD_NAMES.items()))
def test_old_names_import_from_their_old_modules(module, names):
    loaded = importlib.import_module(module)
    missing = [name for name in names if not hasattr(loaded, name)]
    assert not missing, missing


def test_old_and_new_calibration_paths_are_one_module_and_calibrate_stays_the_function():
    from mergekit_fisher_mask.calibrate.data import select_examples as old  # the 0.2 README's form

    from mergekit_fisher_mask.calibration.data import select_examples as new

    assert old is new
    assert importlib.import_module("mergekit_fisher_mask.calibrate.data") is importlib.import_module(
        "mergekit_fisher_mask.calibration.data")
    assert callable(mergekit_fisher_mask.calibrate) and mergekit_fisher_mask.calibrate.__name__ == "calibrate"
    from mergekit_fisher_mask.calibrate import Placement

    from mergekit_fisher_mask.calibration import Placement as NewPlacement

    assert Placement is NewPlacement
