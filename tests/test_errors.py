"""Bad input fails with a clear message, before any output is written, and never touches the inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import make_tokenizer, write_jsonl
from mergekit.options import MergeOptions
from safetensors.torch import save_file

from mergekit_fisher_mask import CalibrationSettings, calibrate
from mergekit_fisher_mask.errors import (
    CalibrationDataError,
    FisherFileError,
    FisherMaskError,
    RecipeError,
    UnsupportedArchitectureError,
)
from mergekit_fisher_mask.files import load_mask_fisher
from mergekit_fisher_mask.pipeline import MARKER, run_fisher_merge

OPTIONS = MergeOptions(quiet=True)


@pytest.fixture
def fishers(model_zoo, text_data, tmp_path):
    """Two BERT classifiers with their Fisher files."""
    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    paths = [tmp_path / f"f{i}.safetensors" for i in range(2)]
    for model, path in zip(models, paths):
        calibrate(str(model), str(text_data), path, CalibrationSettings(samples=8, batch_size=4), progress=False)
    return models, paths


def recipe(tmp_path, models, fishers, **extra) -> Path:
    body = {
        "merge_method": "fisher_mask",
        "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"fisher": str(f)}} for m, f in zip(models, fishers)],
        **extra,
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def merge_fails(tmp_path, recipe_path, error, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_fisher_merge(str(recipe_path), str(out), OPTIONS, **kwargs)
    assert not out.exists(), "nothing may be written when a merge fails"
    assert not list(tmp_path.glob(".out.partial-*")), "no staging folder may be left behind"


def test_unsupported_architecture(tmp_path, text_data):
    config = transformers.BloomConfig(vocab_size=320, hidden_size=32, n_layer=1, n_head=4)
    folders = [tmp_path / "bloom-a", tmp_path / "bloom-b"]
    for seed, folder in enumerate(folders):
        torch.manual_seed(seed)
        model = transformers.BloomForCausalLM(config)
        model.config.architectures = ["BloomForCausalLM"]
        model.save_pretrained(folder)
        make_tokenizer(False).save_pretrained(folder)
    with pytest.raises(UnsupportedArchitectureError, match=r"'bloom' is not supported.*bert, deberta-v2, distilbert"):
        calibrate(str(folders[0]), str(text_data), tmp_path / "f.safetensors", progress=False)
    assert not (tmp_path / "f.safetensors").exists()
    recipe_path = recipe(tmp_path, folders, [tmp_path / "x.safetensors"] * 2)
    merge_fails(tmp_path, recipe_path, UnsupportedArchitectureError, "bloom")


def test_models_of_different_shapes(model_zoo, fishers, tmp_path):
    models, paths = fishers
    wide = model_zoo("bert", seed=3, intermediate_size=64)
    merge_fails(tmp_path, recipe(tmp_path, [models[0], wide], paths), RecipeError, "different shapes")


def test_fisher_of_another_architecture(model_zoo, fishers, text_data, tmp_path):
    models, paths = fishers
    llama_fisher = tmp_path / "llama.safetensors"
    calibrate(str(model_zoo("llama")), str(text_data), llama_fisher, CalibrationSettings(samples=4), progress=False)
    merge_fails(tmp_path, recipe(tmp_path, models, [paths[0], llama_fisher]), FisherFileError, "another architecture")


def test_fisher_of_another_model_is_refused_unless_asked(fishers, tmp_path):
    models, paths = fishers
    swapped = recipe(tmp_path, models, [paths[1], paths[0]])
    merge_fails(tmp_path, swapped, FisherFileError, "different model")
    run_fisher_merge(str(swapped), str(tmp_path / "ok"), OPTIONS, verify_fingerprint=False)
    assert (tmp_path / "ok" / MARKER).exists()


@pytest.mark.parametrize("corruption", ["bytes", "model_file", "nan", "shape"])
def test_corrupt_fisher_files(fishers, tmp_path, corruption):
    models, paths = fishers
    bad = tmp_path / "bad.safetensors"
    good = load_mask_fisher(paths[1])
    meta = good.metadata()
    if corruption == "bytes":
        bad.write_bytes(b"\x00garbage" * 10)
        match = "not a readable safetensors"
    elif corruption == "model_file":
        save_file({"w": torch.zeros(2)}, str(bad))
        match = "not a mask-Fisher file"
    elif corruption == "nan":
        head = good.groups["head_fisher"].clone()
        head[1, 2] = float("nan")
        save_file({"head_fisher": head, "ffn_fisher": good.groups["ffn_fisher"]}, str(bad), metadata=meta)
        match = "NaN or inf"
    else:
        save_file({"head_fisher": good.groups["head_fisher"][:, :2].contiguous(), "ffn_fisher": good.groups["ffn_fisher"]}, str(bad), metadata=meta)
        match = "head_fisher has shape"
    with pytest.raises(FisherFileError, match=match):
        load_mask_fisher(bad)
    merge_fails(tmp_path, recipe(tmp_path, models, [paths[0], bad]), FisherFileError, str(bad).replace(".", r"\."))


def test_missing_columns(model_zoo, text_data, tmp_path):
    model = str(model_zoo("bert"))
    with pytest.raises(CalibrationDataError, match="no column 'body'"):
        calibrate(model, str(text_data), tmp_path / "f.safetensors", CalibrationSettings(text_columns=["body"]), progress=False)
    with pytest.raises(CalibrationDataError, match="no label column 'y'"):
        calibrate(model, str(text_data), tmp_path / "f.safetensors", CalibrationSettings(label_column="y"), progress=False)
    no_labels = write_jsonl(tmp_path / "nolabels.jsonl", [{"text": "w1 w2"}])
    with pytest.raises(CalibrationDataError, match="no label column"):
        calibrate(model, str(no_labels), tmp_path / "f.safetensors", progress=False)
    assert not (tmp_path / "f.safetensors").exists()


def test_empty_data(model_zoo, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": "  ", "label": 0}, {"text": "", "label": 1}])
    with pytest.raises(CalibrationDataError, match="no usable example"):
        calibrate(str(model_zoo("bert")), str(empty), tmp_path / "f.safetensors", progress=False)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        calibrate(str(model_zoo("bert")), str(tmp_path / "missing.jsonl"), tmp_path / "f.safetensors", progress=False)


def test_fewer_samples_than_asked_warns(model_zoo, text_data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        fisher = calibrate(str(model_zoo("bert")), str(text_data), tmp_path / "f.safetensors",
                           CalibrationSettings(samples=1000, batch_size=16), progress=False)
    assert fisher.samples == 40
    assert "only 40 usable examples; 1000 were asked for" in caplog.text


@pytest.mark.parametrize(
    "extra, where",
    [
        ({"paramters": {"scheme": "paper"}}, "unknown key\\(s\\) 'paramters'"),
        ({"parameters": {"shceme": "paper"}}, "parameters: unknown key\\(s\\) 'shceme'"),
        ({"calibration": {"sampels": 3}}, "calibration: unknown key\\(s\\) 'sampels'"),
    ],
)
def test_unknown_recipe_keys(fishers, tmp_path, extra, where):
    models, paths = fishers
    merge_fails(tmp_path, recipe(tmp_path, models, paths, **extra), RecipeError, where)


def test_unknown_per_model_key_and_bad_values(fishers, tmp_path):
    models, paths = fishers
    path = recipe(tmp_path, models, paths)
    body = yaml.safe_load(path.read_text())
    body["models"][1]["weigth"] = 2
    path.write_text(yaml.safe_dump(body))
    merge_fails(tmp_path, path, RecipeError, r"models\[1\]: unknown key\(s\) 'weigth'")
    body["models"][1].pop("weigth")
    body["parameters"] = {"scheme": "papr"}
    path.write_text(yaml.safe_dump(body))
    merge_fails(tmp_path, path, RecipeError, "parameters: scheme: Input should be 'nodes' or 'paper', got 'papr'")


def test_previous_merge_is_refused_unless_overwrite(fishers, tmp_path):
    models, paths = fishers
    path = recipe(tmp_path, models, paths)
    out = tmp_path / "out"
    run_fisher_merge(str(path), str(out), OPTIONS)
    first = (out / MARKER).read_bytes()
    with pytest.raises(FisherMaskError, match="already holds a previous merge.*overwrite=True"):
        run_fisher_merge(str(path), str(out), OPTIONS)
    assert (out / MARKER).read_bytes() == first
    run_fisher_merge(str(path), str(out), OPTIONS, overwrite=True)
    assert (out / MARKER).exists()  # (a file added to a merge is refused: tests/test_safety.py)


def test_interrupted_merge_leaves_nothing_that_looks_complete(fishers, tmp_path, monkeypatch):
    import mergekit_fisher_mask.merge.kernels as kernel

    models, paths = fishers
    path = recipe(tmp_path, models, paths)
    out = tmp_path / "out"
    run_fisher_merge(str(path), str(out), OPTIONS)
    before = sorted(p.name for p in out.iterdir())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway through the tensors

    monkeypatch.setattr(kernel, "weighted_average", crash)
    with pytest.raises(KeyboardInterrupt):
        run_fisher_merge(str(path), str(out), OPTIONS, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before, "the previous merge is intact"
    assert not list(tmp_path.glob(".out.*")), "no partial folder is left behind"
    with pytest.raises(KeyboardInterrupt):
        run_fisher_merge(str(path), str(tmp_path / "fresh"), OPTIONS)
    assert not (tmp_path / "fresh").exists()


def test_calibration_keys_only_for_fisher_mask(fishers, tmp_path, text_data):
    models, _ = fishers
    body = {
        "merge_method": "linear", "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "calibration_data": str(text_data)}} for m in models],
    }
    path = tmp_path / "recipe.yml"
    path.write_text(json.dumps(body))
    merge_fails(tmp_path, path, RecipeError, "only used by fisher_mask")
