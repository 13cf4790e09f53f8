"""Cases found by trying the CLI as a new user would (round 3): each was accepted and then crashed mid-run, was
silently ignored, or failed with a message that did not say what to do. Every one is now refused before any work
with a message naming the input and the fix; "before any work" is asserted with the ``no_work`` fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import data_for
from test_safety import OPTIONS, SETTINGS, setup, snapshot, user_folder  # noqa: F401 (fixture)
from test_trust import cli, no_work  # noqa: F401 (fixture)
from transformers import AutoModelForSequenceClassification

from mergekit_fisher_mask import CalibrationSettings, MaskFisher, calibrate, calibrate_full, calibrate_gram
from mergekit_fisher_mask.calibration.placement import accelerator_type
from mergekit_fisher_mask.errors import FisherFileError, OutputPathError, RecipeError, SettingsError
from mergekit_fisher_mask.files import INDEX_NAME, FullFisher, GramStats
from mergekit_fisher_mask.merge.recipe import load_recipe
from mergekit_fisher_mask.pipeline import run_fisher_merge

cpu_only = pytest.mark.skipif(accelerator_type() is not None, reason="asks for a GPU that a CPU-only machine lacks")


def write_recipe(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def two_model_recipe(tmp_path, models, method, per_model, shared=None) -> Path:
    config = {"merge_method": method, "base_model": str(models[0]),
              "models": [{"model": str(m), "parameters": dict(p)} for m, p in zip(models, per_model)]}
    if shared:
        config["parameters"] = shared
    return write_recipe(tmp_path / "recipe.yml", config)


# --------------------------------------------------------------------------------------------------------------
# Settings that a statistic's pass does not read
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("statistic, extra, named", [
    ([], ["--gram-inputs", "attn_in"], "--gram-inputs"),
    ([], ["--gram-dtype", "bfloat16"], "--gram-dtype"),
    ([], ["--chunk-size", "2"], "--chunk-size"),
    (["--gram"], ["--estimator", "sampled"], "--estimator"),
    (["--gram"], ["--aggregate", "normalized"], "--aggregate"),
    (["--full"], ["--gram-inputs", "ffn_in"], "--gram-inputs"),
    (["--gram"], ["--label-column", "y"], "--label-column"),  # only a loss reads labels and targets
    (["--gram"], ["--target-column", "summary"], "--target-column"),
])
def test_a_setting_the_measured_statistic_does_not_read_is_refused(model_zoo, text_data, tmp_path, no_work,
                                                                   statistic, extra, named):
    out = tmp_path / "out"
    result = cli("calibrate", model_zoo("llama"), "--data", text_data, "--out", out, *statistic, *extra, "--quiet")
    assert isinstance(result.exception, SettingsError), result.output
    assert f"{named} does not apply to the" in str(result.exception) and "Remove it" in str(result.exception)
    assert not out.exists()


def test_the_default_value_of_another_pass_s_setting_is_accepted(model_zoo, text_data, tmp_path):
    settings = CalibrationSettings(samples=4, batch_size=2, gram_dtype="float32", chunk_size=8)  # both the defaults
    calibrate(str(model_zoo("llama")), str(text_data), tmp_path / "f.safetensors", settings, progress=False)
    assert MaskFisher.read(tmp_path / "f.safetensors").samples == 4


def test_python_callers_get_the_parameter_names(model_zoo, text_data, tmp_path, no_work):
    with pytest.raises(SettingsError, match=r"gram_inputs does not apply to the full Fisher this run measures; it is read only when measuring the Gram"):
        calibrate_full(str(model_zoo("llama")), str(text_data), tmp_path / "f", {"gram_inputs": ["attn_in"]})


def test_a_merge_refuses_calibration_settings_its_statistic_does_not_read(setup, text_data, tmp_path, no_work):
    models, _, _ = setup
    recipe = two_model_recipe(tmp_path, models, "fisher_mask", [{"calibration_data": str(text_data)}] * 2)
    config = yaml.safe_load(recipe.read_text())
    config["calibration"] = {"samples": 4, "gram_inputs": ["attn_in"]}
    write_recipe(recipe, config)
    with pytest.raises(SettingsError, match="gram_inputs does not apply to the mask Fisher"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS)
    assert not (tmp_path / "out").exists()
    result = cli("merge", recipe, tmp_path / "out")  # on the command line too, the recipe's own key is named
    message = str(result.exception)
    assert isinstance(result.exception, SettingsError), result.output
    assert message.startswith(f"{recipe}: calibration of ") and "--gram-inputs" not in message, message
    assert message.endswith("Remove it, or change merge_method."), message


def test_a_calibration_block_no_model_uses_is_said_to_be_unused(setup, tmp_path, caplog):
    models, fishers, _ = setup
    recipe = two_model_recipe(tmp_path, models, "fisher_mask", [{"fisher": str(f)} for f in fishers])
    config = yaml.safe_load(recipe.read_text())
    config["calibration"] = {"samples": 4}
    write_recipe(recipe, config)
    load_recipe(str(recipe))
    assert "the `calibration:` block is not used" in caplog.text


# --------------------------------------------------------------------------------------------------------------
# Recipes mergekit would silently misread
# --------------------------------------------------------------------------------------------------------------


def test_a_shared_parameter_given_per_model_is_refused(setup, tmp_path):
    models, fishers, _ = setup
    recipe = two_model_recipe(tmp_path, models, "fisher_mask",
                              [{"fisher": str(fishers[0]), "scheme": "lm"}, {"fisher": str(fishers[1])}])
    with pytest.raises(RecipeError, match=r"model .*: scheme is shared by every model.*top-level `parameters:`"):
        load_recipe(recipe)


def test_a_required_per_model_parameter_missing_for_one_model_is_refused(setup, tmp_path):
    models, _, _ = setup
    recipe = two_model_recipe(tmp_path, models, "linear", [{"weight": 1.0}, {}])
    with pytest.raises(RecipeError, match=rf"linear needs `weight` for every model, and model '{models[1]}' has none"):
        load_recipe(recipe)
    # Given once for all models it is enough.
    load_recipe(two_model_recipe(tmp_path, models, "linear", [{}, {}], shared={"weight": 0.5}))


# --------------------------------------------------------------------------------------------------------------
# Task heads: mergekit also reads the base model when it is not merged
# --------------------------------------------------------------------------------------------------------------


def test_a_base_model_with_another_head_shape_is_compared_too(model_zoo, text_data, tmp_path):
    base = model_zoo("bert", seed=7, num_labels=2)  # the zoo's BERT classifiers have 3 labels
    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    fishers = []
    for k, model in enumerate(models):
        fishers.append(tmp_path / f"f{k}.safetensors")
        calibrate(str(model), str(text_data), fishers[-1], SETTINGS, progress=False)
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "fisher_mask", "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"fisher": str(f)}} for m, f in zip(models, fishers)],
    })
    result = cli("merge", recipe, tmp_path / "out", "--task-heads", "merge")
    assert isinstance(result.exception, RecipeError), result.output
    assert f"{base}: classifier.bias (2,), classifier.weight (2, 32)" in str(result.exception) and "--task-heads auto or base" in str(
        result.exception)
    assert not (tmp_path / "out").exists()
    result = cli("merge", recipe, tmp_path / "out")  # auto: the head comes from the base model
    assert result.exit_code == 0, result.output
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")  # the head is in its own shard
    assert model.classifier.weight.shape[0] == 2 and model.config.num_labels == 2


# --------------------------------------------------------------------------------------------------------------
# Offload folders: scratch space, never a file, an input or the output
# --------------------------------------------------------------------------------------------------------------


OFFLOAD = ["--device-map", "auto", "--max-memory", "cpu=60KB"]


def test_an_offload_folder_that_is_a_file_is_refused(model_zoo, text_data, tmp_path, no_work):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = cli("calibrate", model_zoo("llama"), "--data", text_data, "--out", tmp_path / "f.safetensors",
                 *OFFLOAD, "--offload-folder", notes, "--quiet")
    assert isinstance(result.exception, OutputPathError), result.output
    assert f"--offload-folder {notes} is a file; give a folder" in str(result.exception)
    assert notes.read_text() == "mine"


def test_scratch_folders_that_cannot_take_files_are_named_as_the_user_gave_them(model_zoo, text_data, tmp_path,
                                                                                 no_work):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = cli("calibrate", model_zoo("llama"), "--data", text_data, "--out", tmp_path / "f.safetensors",
                 *OFFLOAD, "--offload-folder", notes / "offload", "--quiet")
    assert isinstance(result.exception, OutputPathError), result.output
    assert f"--offload-folder {notes / 'offload'} cannot be created: {notes} is a file" in str(result.exception)
    assert "probe" not in str(result.exception) and notes.read_text() == "mine"


def test_placement_options_without_a_device_map_are_named_as_typed(model_zoo, text_data, tmp_path, no_work):
    result = cli("calibrate", model_zoo("llama"), "--data", text_data, "--out", tmp_path / "f.safetensors",
                 "--max-memory", "cpu=10GiB", "--quiet")
    assert isinstance(result.exception, SettingsError), result.output
    assert "--max-memory places a device-mapped model; set --device-map too" in str(result.exception)
    assert "offload" not in str(result.exception)


@pytest.mark.parametrize("where", ["model", "out"])
def test_an_offload_folder_inside_the_model_or_the_output_is_refused(model_zoo, text_data, tmp_path, no_work, where):
    model = tmp_path / "model"
    shutil.copytree(model_zoo("llama"), model)
    before = snapshot(model)
    out = tmp_path / "grams"
    offload = (model if where == "model" else out) / "offload"
    result = cli("calibrate", model, "--data", text_data, "--out", out, "--gram", *OFFLOAD, "--offload-folder",
                 offload, "--quiet")
    assert isinstance(result.exception, OutputPathError), result.output
    assert f"--offload-folder {offload} lies inside" in str(result.exception)
    assert snapshot(model) == before and not out.exists()


def test_a_merge_refuses_an_offload_folder_inside_its_output(setup, text_data, tmp_path, no_work):
    models, _, _ = setup
    recipe = two_model_recipe(tmp_path, models, "fisher_mask", [{"calibration_data": str(text_data)}] * 2)
    config = yaml.safe_load(recipe.read_text())
    config["calibration"] = {"samples": 4, "device_map": "auto", "offload_folder": str(tmp_path / "out" / "scratch")}
    write_recipe(recipe, config)
    with pytest.raises(OutputPathError, match="offload folder .* lies inside the output"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS)
    assert not (tmp_path / "out").exists()


def test_an_offload_folder_that_holds_the_model_is_scratch_space_and_is_left_as_it_was(model_zoo, text_data,
                                                                                        tmp_path):
    work = tmp_path / "work"  # the user's folder: the model is inside it, and the run writes only a folder of its own
    shutil.copytree(model_zoo("llama"), work / "model")
    before = snapshot(work)
    settings = CalibrationSettings(samples=4, batch_size=2, device_map="auto", max_memory="cpu=60KB",
                                   offload_folder=str(work))
    calibrate(str(work / "model"), str(text_data), tmp_path / "f.safetensors", settings, progress=False)
    assert snapshot(work) == before


def test_an_offload_folder_the_run_created_is_removed_afterwards(model_zoo, text_data, tmp_path):
    offload = tmp_path / "new" / "offload"
    settings = CalibrationSettings(samples=4, batch_size=2, device_map="auto", max_memory="cpu=60KB",
                                   offload_folder=str(offload))
    calibrate(str(model_zoo("llama")), str(text_data), tmp_path / "f.safetensors", settings, progress=False)
    assert not (tmp_path / "new").exists(), "folders the run made for its scratch files are removed"
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    calibrate(str(model_zoo("llama")), str(text_data), tmp_path / "g.safetensors",
              settings.model_copy(update={"offload_folder": str(mine)}), progress=False)
    assert snapshot(mine) == before, "the user's own folder and files are left as they were"


# --------------------------------------------------------------------------------------------------------------
# Devices this machine does not have
# --------------------------------------------------------------------------------------------------------------


@cpu_only
def test_a_device_map_naming_a_missing_gpu_is_refused_before_any_work(model_zoo, text_data, tmp_path, no_work):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"": 0}))
    result = cli("calibrate", model_zoo("llama"), "--data", text_data, "--out", tmp_path / "f.safetensors",
                 "--device-map", mapping, "--quiet")
    assert isinstance(result.exception, SettingsError), result.output
    assert "--device-map asks for GPU 0, and this machine has no accelerator" in str(result.exception)


@cpu_only
@pytest.mark.parametrize("flag", ["--cuda", "--gpu-rich"])
def test_merge_with_cuda_on_a_machine_without_one_is_refused_before_any_work(setup, tmp_path, no_work, flag):
    _, _, recipe = setup
    result = cli("merge", recipe, tmp_path / "out", flag)
    assert isinstance(result.exception, SettingsError), result.output
    assert f"{flag} asks for device cuda" in str(result.exception) and "no accelerator" in str(result.exception)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# Damaged or mistaken statistic files: one line naming the file, before the merge starts
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def full_fishers(setup, text_data, tmp_path):
    models, _, _ = setup
    folders = [tmp_path / f"full{k}" for k in range(2)]
    for model, folder in zip(models, folders):
        calibrate_full(str(model), str(text_data), folder, SETTINGS, progress=False)
    recipe = two_model_recipe(tmp_path, models, "fisher", [{"fisher": str(f)} for f in folders])
    return folders, recipe


def test_a_truncated_shard_is_found_before_the_merge_starts(full_fishers, tmp_path, no_work):
    folders, recipe = full_fishers
    shard = sorted(folders[1].glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(FisherFileError, match=rf"{shard}, a shard listed by .*, cannot be read .*truncated"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS)
    shard.unlink()
    with pytest.raises(FisherFileError, match=rf"{shard}, a shard listed by .*, is missing"):
        FullFisher.read(folders[1])


def test_a_binary_index_and_a_file_for_a_folder_are_named_plainly(full_fishers, setup, tmp_path):
    folders, _ = full_fishers
    (folders[0] / INDEX_NAME).write_bytes(bytes(range(256)))
    with pytest.raises(FisherFileError, match=r"is not a JSON index of .* \(it is binary\)"):
        FullFisher.read(folders[0])
    _, fishers, _ = setup
    with pytest.raises(FisherFileError, match=rf"{fishers[0]} is a file; .* is a folder"):
        FullFisher.read(fishers[0])
    with pytest.raises(FisherFileError, match=rf"{folders[1]} is a folder; a mask-Fisher file is one .safetensors"):
        MaskFisher.read(folders[1])


def test_gram_folders_of_different_gram_inputs_are_refused_before_the_merge(model_zoo, tmp_path, monkeypatch):
    models = [model_zoo("llama", seed=s) for s in (1, 2)]
    data = data_for("llama", tmp_path)
    folders = [tmp_path / "g0", tmp_path / "g1"]
    calibrate_gram(str(models[0]), str(data), folders[0], SETTINGS, progress=False)
    calibrate_gram(str(models[1]), str(data), folders[1], SETTINGS.model_copy(update={"gram_inputs": ("attn_in",)}),
                   progress=False)
    assert set(GramStats.read(folders[1]).inputs) < set(GramStats.read(folders[0]).inputs)
    recipe = two_model_recipe(tmp_path, models, "regmean", [{"gram": str(f)} for f in folders])
    monkeypatch.setattr("mergekit.merge.run_merge", lambda *a, **k: pytest.fail("the merge started"))
    with pytest.raises(FisherFileError, match=r"measured different inputs .*Calibrate every model with the same "
                                              r"gram_inputs"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), OPTIONS)


# --------------------------------------------------------------------------------------------------------------
# A merge's files the user edited afterwards are theirs
# --------------------------------------------------------------------------------------------------------------


def test_overwrite_refuses_a_merge_whose_readme_the_user_edited(setup, tmp_path):
    _, _, recipe = setup
    out = tmp_path / "out"
    run_fisher_merge(str(recipe), str(out), OPTIONS)
    run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True)  # untouched: the tool's to replace
    readme = out / "README.md"
    readme.write_text(readme.read_text() + "\nMy evaluation notes: two weeks of runs.\n")
    before = snapshot(out)
    with pytest.raises(OutputPathError, match=r"did not write or that changed since \(README\.md \(changed since this tool wrote it\)\)"):
        run_fisher_merge(str(recipe), str(out), OPTIONS, overwrite=True)
    assert snapshot(out) == before
