"""Model card metadata (checked with huggingface_hub.ModelCard) and the --push-to-hub path (no network needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard, ModelCardData

import mergekit_fisher_mask.hub as hub
from mergekit_fisher_mask.cli import main
from mergekit_fisher_mask.merge.model_card import write_model_card
from mergekit_fisher_mask.merge.recipe import Recipe


@pytest.fixture
def recipe_file(model_zoo, text_data, tmp_path):
    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "fisher_mask",
        "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"calibration_data": str(text_data)}} for m in models],
        "calibration": {"samples": 6, "batch_size": 3, "estimator": "expected"},
    }))
    return path


def test_card_of_a_real_merge_loads_and_carries_the_details(recipe_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(recipe_file), str(out), "--fisher-cache", str(tmp_path / "c")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out / "README.md")
    assert set(card.data.tags) >= {"merge", "mergekit", "fisher-mask"}
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    ModelCardData(**card.data.to_dict())  # the metadata round-trips through huggingface_hub's schema
    assert "estimator: expected" in card.text  # the recipe, verbatim
    assert "| 6 | expected | cross_entropy | top 10% of nodes hold" in card.text
    assert (out / "mergekit_config.yml").read_text() == recipe_file.read_text()


def test_card_lists_hub_ids_as_base_models(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig()
    config.architectures = ["LlamaForCausalLM"]
    text = "merge_method: fisher_mask\nmodels:\n  - model: org/a\n  - model: org/b\n"
    recipe = Recipe(yaml.safe_load(text), source_text=text, path=str(tmp_path / "r.yml"))
    write_model_card(tmp_path, recipe, {}, config=config, heads_from=None)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == ["org/a", "org/b"] and card.data.pipeline_tag == "text-generation"


def test_missing_token_fails_before_any_work(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setattr("mergekit_fisher_mask.cli.run_fisher_merge", lambda *a, **k: pytest.fail("merged without a token"))
    result = CliRunner().invoke(main, ["merge", str(recipe_file), str(tmp_path / "out"), "--push-to-hub", "me/model"])
    assert result.exit_code != 0
    assert "needs a Hugging Face token" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_failed_merge_never_pushes(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.setattr(hub, "push_folder", lambda *a, **k: pytest.fail("pushed a failed merge"))
    import mergekit_fisher_mask.merge.kernels as kernel

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(kernel, "weighted_average", crash)
    result = CliRunner().invoke(main, ["merge", str(recipe_file), str(tmp_path / "out"), "--push-to-hub", "me/model",
                                       "--fisher-cache", str(tmp_path / "c")])
    assert result.exit_code != 0 and "disk full" in str(result.exception)


def fake_api(calls, existing_public=False):
    """A stand-in for huggingface_hub.HfApi that records calls; ``existing_public``: the repo exists and is public."""

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["private"]))
            return f"https://hub.invalid/{repo_id}"

        def repo_info(self, repo_id, **kwargs):
            return SimpleNamespace(private=not existing_public)

        def upload_folder(self, folder_path, repo_id, **kwargs):
            from pathlib import Path

            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    return FakeApi


def test_successful_merge_pushes_the_finished_folder(recipe_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.setattr("huggingface_hub.HfApi", fake_api(calls))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(recipe_file), str(out), "--push-to-hub", "me/model", "--private",
                                       "--fisher-cache", str(tmp_path / "c")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert calls[0] == ("token", "hf_test") and calls[1] == ("create", "me/model", True)
    assert calls[2][0] == "upload" and "README.md" in calls[2][2] and "fisher_merge.json" in calls[2][2]


def test_private_push_into_an_existing_public_repo_uploads_nothing(recipe_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.setattr("huggingface_hub.HfApi", fake_api(calls, existing_public=True))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(recipe_file), str(out), "--push-to-hub", "me/model", "--private",
                                       "--fisher-cache", str(tmp_path / "c")])
    assert result.exit_code != 0 and "already exists and is public" in str(result.exception)
    assert not [c for c in calls if c[0] == "upload"] and (out / "fisher_merge.json").is_file()


def test_private_without_push_to_hub_is_refused(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setattr("mergekit_fisher_mask.cli.run_fisher_merge", lambda *a, **k: pytest.fail("merged anyway"))
    result = CliRunner().invoke(main, ["merge", str(recipe_file), str(tmp_path / "out"), "--private"])
    assert result.exit_code != 0 and "--private applies to --push-to-hub" in str(result.exception)
