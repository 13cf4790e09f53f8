"""End to end: YAML recipe -> `mergekit-fisher merge` -> `from_pretrained`, with calibration from the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from conftest import ARCHS, data_for, random_text, task_of_arch, write_jsonl
from mergekit.merge_methods import merge_state_dicts
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_fisher_mask import FISHER_MASK
from mergekit_fisher_mask.cli import main
from mergekit_fisher_mask.errors import RecipeError
from mergekit_fisher_mask.pipeline import run_fisher_merge


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load(arch, directory):
    auto = getattr(transformers, task_of_arch(arch).auto_class)
    model, info = auto.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def state(directory) -> dict:
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_yaml_to_from_pretrained(arch, model_zoo, tmp_path):
    models = [model_zoo(arch, seed=s) for s in (1, 2, 3)]
    data = data_for(arch, tmp_path)
    fishers = []
    for i, model in enumerate(models):
        fishers.append(tmp_path / f"f{i}.safetensors")
        invoke("calibrate", model, "--data", data, "--out", fishers[-1], "--samples", 12, "--batch-size", 4, "--quiet")
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "fisher_mask",
        "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"fisher": str(f), "weight": w}}
                   for m, f, w in zip(models, fishers, (1.0, 0.5, 2.0))],
        "parameters": {"scheme": "paper", "normalize": "layer"},
        "dtype": "float32",
    })
    out = tmp_path / "merged"
    invoke("merge", recipe, out, "--quiet")
    merged = load(arch, out)
    # The merge equals the kernel applied to the models as transformers loads them (MoE experts fused, as mergekit
    # plans them), tensor by tensor.
    inputs = [{k: v for k, v in load(arch, m).state_dict().items() if v.is_floating_point()} for m in models]
    expected = merge_state_dicts(
        inputs, FISHER_MASK, base=0,
        parameters={"fisher": [str(f) for f in fishers], "weight": [1.0, 0.5, 2.0], "scheme": "paper"},
    )
    written = merged.state_dict()
    if arch == "bert-qa":  # mergekit 0.1.5 does not plan BERT's QA head: it comes from base_model (with a warning)
        expected.update({k: v for k, v in inputs[0].items() if k.startswith("qa_outputs.")})
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, msg=name)
    assert merged.config.model_type == load(arch, models[0]).config.model_type
    card = (out / "README.md").read_text()
    assert "fisher_mask" in card and "scheme: paper" in card and "| 12 | empirical |" in card
    assert json.loads((out / "fisher_merge.json").read_text())["method"] == "fisher_mask"


def test_classifiers_with_different_num_labels_take_head_from_base(model_zoo, tmp_path):
    generator = torch.Generator().manual_seed(0)
    three = model_zoo("bert", seed=1)  # num_labels=3
    two = model_zoo("bert", seed=2, num_labels=2)
    write_jsonl(tmp_path / "d2.jsonl", [{"text": random_text(generator), "label": i % 2} for i in range(20)])
    data3 = write_jsonl(tmp_path / "d3.jsonl", [{"sentence": random_text(generator), "y": i % 3} for i in range(20)])
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "fisher_mask",
        "base_model": str(two),
        "models": [
            {"model": str(three), "parameters": {"calibration_data": {"data": str(data3), "label_column": "y"}}},
            {"model": str(two), "parameters": {"calibration_data": "d2.jsonl"}},  # relative to the recipe
        ],
        "calibration": {"samples": 8, "batch_size": 4},
    })
    out, cache = tmp_path / "merged", tmp_path / "cache"
    invoke("merge", recipe, out, "--fisher-cache", cache)
    merged = load("bert", out)
    assert merged.config.num_labels == 2
    # mergekit merged under the plugin's head-free definition; the output names the real architecture again.
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    base = state(two)
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.equal(state(out)[name], base[name])
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert "The task head and config come from" in (out / "README.md").read_text()

    # A re-run reuses the cached Fisher files instead of calibrating again.
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    import mergekit_fisher_mask.cache as cache_module

    def fail(*args, **kwargs):
        raise AssertionError("calibrated again despite the cache")

    original, cache_module.measure_statistic = cache_module.measure_statistic, fail
    try:
        invoke("merge", recipe, out, "--fisher-cache", cache, "--overwrite")
    finally:
        cache_module.measure_statistic = original
    assert stamps == {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}

    # --heads merge cannot merge heads of two shapes: refused before any calibration, with the shapes named.
    cache_module.measure_statistic = fail
    try:
        with pytest.raises(RecipeError, match=r"heads merge needs task heads of one shape.*\(3, 32\).*\(2, 32\)"):
            run_fisher_merge(str(recipe), str(tmp_path / "other"), MergeOptions(quiet=True), heads="merge",
                             cache_dir=tmp_path / "empty-cache")
    finally:
        cache_module.measure_statistic = original


def test_no_base_model_uses_first_and_says_so(model_zoo, text_data, tmp_path, caplog):
    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    fishers = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for model, fisher in zip(models, fishers):
        invoke("calibrate", model, "--data", text_data, "--out", fisher, "--samples", 8, "--quiet")
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "fisher_mask",
        "models": [{"model": str(m), "parameters": {"fisher": str(f)}} for m, f in zip(models, fishers)],
    })
    with caplog.at_level("WARNING"):
        invoke("merge", recipe, tmp_path / "out")
    assert "no base_model" in caplog.text and str(models[0]) in caplog.text
    load("bert", tmp_path / "out")


def test_mergekit_options_pass_through_and_inputs_stay_untouched(model_zoo, text_data, tmp_path):
    models = [model_zoo("llama", seed=s) for s in (4, 5)]
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for m in models for p in Path(m).iterdir()}
    fishers = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for model, fisher in zip(models, fishers):
        invoke("calibrate", model, "--data", text_data, "--out", fisher, "--samples", 8, "--quiet")
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "fisher_mask",
        "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"fisher": str(f)}} for m, f in zip(models, fishers)],
    })
    out = tmp_path / "out"
    invoke("merge", recipe, out, "--out-shard-size", "40K", "--no-copy-tokenizer", "--quiet")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert not (out / "tokenizer.json").exists()
    load("llama", out)
    assert digests == {p: hashlib.sha256(p.read_bytes()).hexdigest() for m in models for p in Path(m).iterdir()}


def test_linear_through_our_cli_strips_nothing_it_needs(model_zoo, tmp_path):
    models = [model_zoo("gpt2", seed=s) for s in (1, 2)]
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "linear", "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    })
    invoke("merge", recipe, tmp_path / "out")
    merged = state(tmp_path / "out")
    a, b = state(models[0]), state(models[1])
    name = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2)


def test_console_script_reports_user_errors_without_traceback(tmp_path):
    missing = tmp_path / "nope.yml"
    missing.write_text("merge_method: fisher_mask\nmodels: []\nmistake: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "mergekit_fisher_mask", "merge", str(missing), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "unknown key(s) 'mistake'" in result.stderr and "Traceback" not in result.stderr


def test_linear_merge_of_classifiers_with_different_heads(model_zoo, tmp_path):
    three, two = model_zoo("bert", seed=1), model_zoo("bert", seed=2, num_labels=2)
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "linear", "base_model": str(two),
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (three, two)],
    })
    invoke("merge", recipe, tmp_path / "out")
    assert load("bert", tmp_path / "out").config.num_labels == 2
    assert torch.equal(state(tmp_path / "out")["classifier.weight"], state(two)["classifier.weight"])


def test_heads_base_on_models_without_task_heads_is_a_no_op(model_zoo, tmp_path):
    models = [model_zoo("llama", seed=s) for s in (1, 2)]
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "linear", "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    })
    invoke("merge", recipe, tmp_path / "out", "--heads", "base")
    load("llama", tmp_path / "out")
