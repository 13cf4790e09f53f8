"""Bad input gets one clear line naming what is wrong, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import sys

import pytest
import torch
import transformers
import yaml
from conftest import save_model, write_jsonl

from mergekit_fisher_mask import CalibrationSettings, calibrate, calibrate_full, cli
from mergekit_fisher_mask.checkpoints import model_fingerprint
from mergekit_fisher_mask.errors import (
    CalibrationDataError,
    FisherFileError,
    FisherMaskError,
    ModelLoadError,
    RecipeError,
    SettingsError,
)

SETTINGS = CalibrationSettings(samples=8, batch_size=4)


def run_cli(monkeypatch, capsys, *args) -> tuple:
    """The console entry point in-process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mergekit-fisher", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    return exit_info.value.code, capsys.readouterr().err


def one_line_error(monkeypatch, capsys, tmp_path, *args, match: str) -> None:
    code, err = run_cli(monkeypatch, capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    assert not list(tmp_path.glob("**/out*")), "nothing may be written"


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.jsonl", b"", "is empty (0 bytes)"),
        ("empty.csv", b"", "is empty (0 bytes)"),
        ("empty.txt", b"", "is empty (0 bytes)"),
        ("blank.jsonl", b"\n\n", "holds no rows"),
        ("bad.jsonl", b'{"text": "w1", "label": 0}\n{"text": "w2", label: 1}\n', "line 2 is not valid JSON"),
        ("fake.parquet", b"text,label\nw1,0\n", "is not a Parquet file"),
        ("latin.jsonl", b'{"text": "caf\xe9", "label": 0}\n', "is not UTF-8 text: byte 0xe9 on line 1"),
        ("latin.csv", b"text,label\nw1,0\ncaf\xe9,1\n", "byte 0xe9 on line 3"),
        ("null.jsonl", b'{"text": "w1 w2", "label": null}\n', "label None is not a class id"),
        ("float.jsonl", b'{"text": "w1 w2", "label": 0.7}\n', "label 0.7 is not a class id"),
        ("range.jsonl", b'{"text": "w1 w2", "label": 5}\n', "label 5 is out of range"),
        ("name.jsonl", b'{"text": "w1 w2", "label": "cat"}\n', "label 'cat' is not in the model's label2id"),
    ],
)
def test_bad_data_files(model_zoo, tmp_path, monkeypatch, capsys, name, content, match):
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=match.replace("(", r"\(").replace(")", r"\)")):
        calibrate(str(model_zoo("bert")), str(data), tmp_path / "out.safetensors", SETTINGS, progress=False)
    one_line_error(monkeypatch, capsys, tmp_path, "calibrate", model_zoo("bert"), "--data", data,
                   "--out", tmp_path / "out.safetensors", match=match)


def test_integral_float_labels_are_accepted(model_zoo, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2 w3", "label": float(i % 3)} for i in range(6)])
    assert calibrate(str(model_zoo("bert")), str(data), tmp_path / "f.safetensors", SETTINGS, progress=False).samples == 6


def test_regressor_labels_must_be_numbers(model_zoo, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2", "label": "high"}])
    with pytest.raises(CalibrationDataError, match="row 1: label 'high' is not a number; this model is a regressor"):
        calibrate(str(model_zoo("bert", num_labels=1)), str(data), tmp_path / "f.safetensors", progress=False)


def long_texts(tmp_path, words=40):
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 40}" for j in range(words)), "label": i % 3} for i in range(6)]
    return write_jsonl(tmp_path / "long.jsonl", rows)


@pytest.mark.parametrize("arch, positions, limit", [("bert", 16, 16), ("roberta", 18, 17), ("gpt2", 16, 16)])
def test_max_length_is_capped_at_absolute_positions(arch, positions, limit, model_zoo, tmp_path, caplog):
    key = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    model = str(model_zoo(arch, **{key: positions}))
    data = long_texts(tmp_path)
    with caplog.at_level(logging.WARNING):
        capped = calibrate(model, str(data), tmp_path / "a.safetensors", SETTINGS, progress=False)
    assert caplog.text.count(f"max_length 256 is more than the model's {limit} positions; using {limit}") == 1
    explicit = calibrate(model, str(data), tmp_path / "b.safetensors",
                         CalibrationSettings(samples=8, batch_size=4, max_length=limit), progress=False)
    assert torch.equal(capped.groups["head_fisher"], explicit.groups["head_fisher"]) and capped.data["max_length"] == limit


def test_rotary_models_past_their_length_warn(model_zoo, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        fisher = calibrate(str(model_zoo("llama")), str(long_texts(tmp_path, 80)), tmp_path / "f.safetensors",
                           CalibrationSettings(samples=4, batch_size=4, max_length=100), progress=False)
    assert "max_length 100 is more than the 64 positions the model was trained on" in caplog.text
    assert fisher.data["max_length"] == 100


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("--micro-batch-size", "-1", "micro_batch_size: Input should be greater than 0, got -1"),
        ("--samples", "0", "samples: Input should be greater than 0"),
        ("--batch-size", "0", "batch_size: Input should be greater than 0"),
        ("--chunk-size", "0", "chunk_size: Input should be greater than 0"),
        ("--max-memory", "cpu=lots", "size 'lots' for device 'cpu' is not a size"),
        ("--device-map", "everywhere", "expected one of auto, balanced"),
        ("--offload-folder", "off", "--offload-folder places a device-mapped model; set --device-map too"),
    ],
)
def test_invalid_settings(model_zoo, text_data, tmp_path, monkeypatch, capsys, option, value, match):
    one_line_error(monkeypatch, capsys, tmp_path, "calibrate", model_zoo("bert"), "--data", text_data,
                   "--out", tmp_path / "out.safetensors", option, value, match=match)


def test_settings_validate_once_everywhere():
    with pytest.raises(ValueError, match="micro_batch_size"):  # pydantic's own error for Python callers
        CalibrationSettings(micro_batch_size=-1)
    with pytest.raises(SettingsError, match="samples: Input should be a valid integer, got 2.5"):
        calibrate("unused", "unused", "unused.safetensors", {"samples": 2.5})


def broken_models(tmp_path, model_zoo):
    good = model_zoo("bert", seed=1)
    no_config = tmp_path / "no-config"
    shutil.copytree(good, no_config)
    (no_config / "config.json").unlink()
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "model.safetensors").unlink()
    with open(pickled / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"bert.embeddings.word_embeddings.weight": Payload()}, handle)
    return {
        "no-config": (no_config, "no-config: no config.json"),
        "truncated": (truncated, "truncated/model.safetensors: not a readable safetensors file"),
        "pickled": (pickled, "pickled/pytorch_model.bin: torch cannot load this pickle checkpoint safely"),
    }


@pytest.mark.parametrize("case", ["no-config", "truncated", "pickled"])
def test_broken_model_folders(case, model_zoo, text_data, tmp_path, monkeypatch, capsys):
    folder, match = broken_models(tmp_path, model_zoo)[case]
    with pytest.raises(ModelLoadError, match=match):
        calibrate(str(folder), str(text_data), tmp_path / "out.safetensors", SETTINGS, progress=False)
    one_line_error(monkeypatch, capsys, tmp_path, "calibrate", folder, "--data", text_data,
                   "--out", tmp_path / "out.safetensors", match=match)
    recipe = tmp_path / "recipe.yml"
    good = model_zoo("bert", seed=2)
    recipe.write_text(yaml.safe_dump({
        "merge_method": "linear", "base_model": str(good),
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (good, folder)],
    }))
    one_line_error(monkeypatch, capsys, tmp_path, "merge", recipe, tmp_path / "out", match=match)


def test_same_model_twice_is_refused(model_zoo, tmp_path):
    model = model_zoo("bert", seed=1)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": str(model), "parameters": {"weight": 1.0}},
                   {"model": str(model) + "/", "parameters": {"weight": 2.0}}],
    }))
    from mergekit_fisher_mask.merge.recipe import load_recipe

    with pytest.raises(RecipeError, match="is listed twice"):
        load_recipe(str(recipe))


@pytest.mark.parametrize("value, match", [("abc", "valid integer, got 'abc'"), (2.5, "valid integer, got 2.5")])
def test_recipe_setting_values(model_zoo, text_data, tmp_path, value, match):
    from mergekit_fisher_mask.merge.recipe import load_recipe

    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fisher_mask", "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"calibration_data": {"data": str(text_data), "samples": value}}}
                   for m in models],
    }))
    with pytest.raises(RecipeError, match=rf"model '.*': calibration_data: samples: Input should be a {match}\.$"):
        load_recipe(str(recipe))


@pytest.mark.parametrize("parameters, top, match", [
    ({"weight": -1}, {}, r"model '.*': parameters: weight: Input should be greater than or equal to 0, got -1\.$"),
    ({}, {"parameters": {"density": 1.5}}, r"parameters: density: Input should be less than or equal to 1, got 1\.5\.$"),
    ({}, {"parameters": {"scheme": "bogus"}}, r"scheme: .*got 'bogus'\.$"),
    ({}, {"dtype": "float99"}, r"dtype: unknown dtype 'float99'; use float32, bfloat16 or float16\.$"),
    ({}, {"out_dtype": 5}, r"out_dtype: unknown dtype 5"),
])
def test_recipe_values_are_one_clear_line(model_zoo, tmp_path, parameters, top, match):
    from mergekit_fisher_mask.merge.recipe import load_recipe

    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fisher_mask", "base_model": str(models[0]), **top,
        "models": [{"model": str(m), "parameters": {"fisher": "f.safetensors", **parameters}} for m in models],
    }))
    with pytest.raises(RecipeError, match=match) as raised:
        load_recipe(str(recipe)).merge_configuration()
    assert "\n" not in str(raised.value) and "pydantic.dev" not in str(raised.value)


@pytest.mark.parametrize("estimator", ["sampled", "expected"])
def test_label_free_estimators_refuse_regressors_in_both_passes(estimator, model_zoo, text_data, tmp_path):
    model = str(model_zoo("bert", num_labels=1))
    settings = CalibrationSettings(samples=4, estimator=estimator)
    for run in (calibrate, calibrate_full):
        with pytest.raises(FisherMaskError, match="regressor"):
            run(model, str(text_data), tmp_path / "out", settings, progress=False)
    assert not (tmp_path / "out").exists()


def test_pickle_models_are_fingerprinted_by_their_weights(tmp_path, text_data):
    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"bin{seed}"
        save_model(folder, "bert", seed=seed)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")  # transformers 5 only writes safetensors
        (folder / "model.safetensors").unlink()
        folders.append(folder)
    prints = [model_fingerprint(f) for f in folders]
    assert prints[0] != prints[1] and all(p.startswith("pt:") for p in prints)
    fisher = tmp_path / "f.safetensors"
    calibrate(str(folders[0]), str(text_data), fisher, SETTINGS, progress=False)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fisher_mask", "base_model": str(folders[0]),
        "models": [{"model": str(folders[1]), "parameters": {"fisher": str(fisher)}},
                   {"model": str(folders[0]), "parameters": {"fisher": str(fisher)}}],
    }))
    from mergekit.options import MergeOptions

    from mergekit_fisher_mask.pipeline import run_fisher_merge

    with pytest.raises(FisherFileError, match="measured on a different model"):
        run_fisher_merge(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))


def test_missing_tokenizer_is_a_clear_error(model_zoo, text_data, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(model_zoo("bert"), folder)
    for file in folder.glob("tokenizer*"):
        file.unlink()
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        calibrate(str(folder), str(text_data), tmp_path / "out.safetensors", SETTINGS, progress=False)


def test_a_model_path_that_is_a_file(model_zoo, text_data, tmp_path):
    with pytest.raises(ModelLoadError, match="is a file; pass the folder"):
        calibrate(str(model_zoo("bert") / "config.json"), str(text_data), tmp_path / "o.safetensors", progress=False)


def test_data_that_is_a_folder(model_zoo, tmp_path):
    with pytest.raises(CalibrationDataError, match="is a folder"):
        calibrate(str(model_zoo("bert")), str(tmp_path), tmp_path / "o.safetensors", progress=False)


@pytest.mark.parametrize("source, hub", [
    ("nyu-mll/glue:sst2@validation", ("nyu-mll/glue", "sst2", "validation")),
    ("rotten_tomatoes", ("rotten_tomatoes", None, "train")),
    ("data/missing.jsonl", None), ("./missing", None), ("a/b/c", None),
])
def test_hub_dataset_names_and_missing_files(source, hub, monkeypatch, tmp_path):
    """org/name[:config][@split] goes to datasets; a path-like name that does not exist is a missing file."""
    import datasets

    from mergekit_fisher_mask.calibration.data import load_rows

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: calls.append((name, config, split)))
    monkeypatch.chdir(tmp_path)
    if hub is None:
        with pytest.raises(CalibrationDataError, match=f"Calibration data file {source} does not exist"):
            load_rows(source)
        assert not calls
    else:
        load_rows(source)
        assert calls == [hub]


def test_description_records_the_data_kind(model_zoo, text_data, tmp_path):
    fisher = calibrate(str(model_zoo("bert")), str(text_data), tmp_path / "f.safetensors", SETTINGS, progress=False)
    assert fisher.data["kind"] == "text" and json.loads(json.dumps(fisher.data)) == fisher.data
