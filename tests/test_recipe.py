"""The recipe loader on its own: no model, no calibration, just YAML in and a checked, immutable Recipe out."""

from __future__ import annotations

import pytest
import yaml

from mergekit_fisher_mask import Estimator, RecipeError
from mergekit_fisher_mask.merge.recipe import load_recipe


def write(tmp_path, body) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(body, sort_keys=False) if isinstance(body, dict) else body)
    return str(path)


def two_models(**parameters):
    return [{"model": "org/a", "parameters": dict(parameters)}, {"model": "org/b", "parameters": dict(parameters)}]


def test_relative_fisher_paths_resolve_against_the_recipe(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    recipe = load_recipe(write(tmp_path, {"merge_method": "fisher_mask", "models": [
        {"model": "org/a", "parameters": {"fisher": "a.safetensors"}},
        {"model": "org/b", "parameters": {"fisher": "missing.safetensors"}},
    ]}))
    assert recipe.fisher_path(("models", 0)) == str(tmp_path / "a.safetensors")
    assert recipe.fisher_path(("models", 1)) == "missing.safetensors"  # left for the Fisher check to report
    assert recipe.model_references() == ["org/a", "org/b"] and recipe.calibrations == ()


def test_calibration_requests_merge_shared_and_per_model_settings(tmp_path):
    recipe = load_recipe(write(tmp_path, {
        "merge_method": "fisher_mask",
        "models": [
            {"model": "org/a", "parameters": {"calibration_data": "hub/dataset@train"}},
            {"model": "org/b", "parameters": {"calibration_data": {"data": "x.jsonl", "samples": 64,
                                                                   "text_column": "body"}}},
        ],
        "calibration": {"samples": 128, "estimator": "expected", "max_length": 64},
    }))
    first, second = recipe.calibrations
    assert (first.model, first.data, first.location) == ("org/a", "hub/dataset@train", ("models", 0))
    assert (first.settings.samples, first.settings.estimator, first.settings.max_length) == (128, Estimator.EXPECTED, 64)
    assert (second.settings.samples, second.settings.text_columns, second.settings.max_length) == (64, ("body",), 64)
    # mergekit never sees this plugin's keys.
    config = recipe.merge_configuration().model_dump()
    assert "calibration" not in yaml.safe_dump(config)
    assert "calibration_data" not in str(recipe.config)


def test_slices_are_read_and_filled_in_place(tmp_path):
    recipe = load_recipe(write(tmp_path, {
        "merge_method": "fisher_mask",
        "slices": [{"sources": [
            {"model": "org/a", "layer_range": [0, 2], "parameters": {"calibration_data": "d"}},
            {"model": "org/b", "layer_range": [0, 2], "parameters": {"calibration_data": "d"}},
        ]}],
    }))
    locations = recipe.model_locations()
    assert locations == [("slices", 0, "sources", 0), ("slices", 0, "sources", 1)]
    filled = recipe.with_fisher_paths({location: f"/f{i}" for i, location in enumerate(locations)})
    assert [filled.fisher_path(loc) for loc in locations] == ["/f0", "/f1"]


def test_the_recipe_is_immutable(tmp_path):
    recipe = load_recipe(write(tmp_path, {"merge_method": "fisher_mask", "models": two_models(calibration_data="d")}))
    before = recipe.config
    filled = recipe.with_fisher_paths({("models", 0): "/a.safetensors"}).with_base_model("org/a")
    assert recipe.config == before and recipe.base_model is None, "the original is unchanged"
    assert filled.fisher_path(("models", 0)) == "/a.safetensors" and filled.base_model == "org/a"
    leaked = recipe.config
    leaked["models"][0]["parameters"]["fisher"] = "/tampered"
    assert recipe.fisher_path(("models", 0)) is None, "config hands out copies"
    with pytest.raises(AttributeError):
        recipe.path = "elsewhere"


@pytest.mark.parametrize(
    "body, match",
    [
        ({"models": two_models()}, "a recipe is a mapping with at least `merge_method`"),
        ({"merge_method": "fisher_mask", "models": two_models(), "calibraton": {}}, r"unknown key\(s\) 'calibraton'"),
        ({"merge_method": "nope", "models": two_models()}, "unknown merge_method 'nope'"),
        ({"merge_method": "fisher_mask", "models": two_models(), "parameters": {"scheme": "papr"}}, "parameters: scheme: Input should be 'nodes' or 'paper', got 'papr'"),
        ({"merge_method": "fisher_mask", "models": two_models(calibration_data={"samples": 3})}, "needs a `data` key"),
        ({"merge_method": "fisher_mask", "models": two_models(calibration_data="d", fisher="f")}, "not both"),
        ({"merge_method": "fisher_mask", "models": two_models(calibration_data="d"), "calibration": {"seed": -1}},
         "calibration: seed: Input should be greater than or equal to 0"),
        ({"merge_method": "fisher_mask", "models": two_models(calibration_data="d"), "calibration": [1]},
         "`calibration` must be a mapping"),
        ({"merge_method": "linear", "models": [{"model": "org/a"}, {"model": "org/a"}]}, "'org/a' is listed twice"),
        ({"merge_method": "linear", "models": ["org/a"]}, r"models\[0\] must be a mapping with a `model` key"),
        ("merge_method: [unclosed", "not valid YAML"),
    ],
)
def test_malformed_recipes(tmp_path, body, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write(tmp_path, body))


def test_the_same_model_in_two_slices_is_fine(tmp_path):
    slice_ = {"sources": [{"model": "org/a", "layer_range": [0, 1]}, {"model": "org/b", "layer_range": [0, 1]}]}
    recipe = load_recipe(write(tmp_path, {"merge_method": "linear", "slices": [slice_, slice_], "parameters": {"weight": 1.0}}))
    assert recipe.model_references() == ["org/a", "org/b", "org/a", "org/b"]
