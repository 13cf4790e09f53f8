"""Full diagonal Fisher (`calibrate --full`) and the `fisher` merge method (Matena & Raffel)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_reference_model, random_text, save_model, task_of_arch, write_jsonl
from mergekit.merge_methods import merge_state_dicts
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from mergekit_fisher_mask import FISHER, CalibrationSettings, FullFisher, NodeShape, calibrate_full
from mergekit_fisher_mask.calibration.data import select_examples
from mergekit_fisher_mask.checkpoints import shard_map
from mergekit_fisher_mask.cli import main
from mergekit_fisher_mask.files import INDEX_NAME, FullFisherReader
from mergekit_fisher_mask.tasks import Task


def reference_full_fisher(model_dir, texts, labels):
    """Batch of one, no padding, ordinary backward: (1/N) sum_n grad_n^2 per parameter."""
    model = load_reference_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for n, text in enumerate(texts):
        model.zero_grad()
        inputs = tokenizer(*text, return_tensors="pt")
        target = inputs["input_ids"] if labels is None else torch.tensor([labels[n]])
        model(**inputs, labels=target).loss.backward()
        for name, p in model.named_parameters():
            sums[name] += p.grad**2
    return {name: value / len(texts) for name, value in sums.items()}


def sentence_pairs(folder):
    """Labelled sentence pairs (BERT's token_type_ids tell the two apart)."""
    generator = torch.Generator().manual_seed(3)
    rows = [{"sentence1": random_text(generator), "sentence2": random_text(generator), "label": i % 3}
            for i in range(12)]
    return write_jsonl(folder / "pairs.jsonl", rows)


# gpt_neox is a decoder *classifier*: its attention must stay causal; bert-pairs needs token_type_ids.
@pytest.mark.parametrize("arch", ["bert", "bert-pairs", "llama", "gpt2", "gpt_neox"])
def test_full_fisher_matches_batch_of_one_reference(arch, model_zoo, text_data, tmp_path):
    pairs = arch == "bert-pairs"
    arch = "bert" if pairs else arch
    data_file = sentence_pairs(tmp_path) if pairs else text_data
    model_dir = model_zoo(arch)
    if pairs:  # BERT's own tokenizer returns token_type_ids (0 for the first text, 1 for the second)
        model_dir = shutil.copytree(model_dir, tmp_path / "bert-pairs")
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}))
        assert set(AutoTokenizer.from_pretrained(model_dir)("w1", "w2")["token_type_ids"]) == {0, 1}
    out = tmp_path / "full"
    result = calibrate_full(
        str(model_dir), str(data_file), out, CalibrationSettings(samples=6, batch_size=4, chunk_size=3), progress=False
    )
    fisher, count = result.tensors, result.samples
    data = select_examples(str(data_file), samples=6, seed=0, needs_labels=task_of_arch(arch) != Task.CAUSAL_LM)
    assert not pairs or len(data.examples[0]) == 2
    reference = reference_full_fisher(model_dir, data.examples, data.labels)
    assert count == 6 and set(fisher) == set(reference)
    scale = max(r.abs().max() for r in reference.values())
    for name, ref in reference.items():
        # BERT's key.bias has an analytically zero gradient: both sides are round-off there.
        tolerance = 1e-4 * ref.abs().max() + 1e-6 * scale
        assert (fisher[name] - ref).abs().max() <= tolerance, name
    reader = FullFisher.read(out)
    assert reader.samples == 6 and reader.estimator == "empirical" and reader.shape == result.shape
    torch.testing.assert_close(reader.tensors[next(iter(reference))], fisher[next(iter(reference))])


def test_full_fisher_is_sharded_like_the_model(tmp_path, text_data):
    model_dir = tmp_path / "sharded"
    save_model(model_dir, "llama", seed=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(model_dir, max_shard_size="60KB")
    model_index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out = tmp_path / "full"
    calibrate_full(str(model_dir), str(text_data), out, CalibrationSettings(samples=4), progress=False)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == len(set(model_index.values())) > 1
    assert set(index["weight_map"]) <= set(model_index)
    for name, shard in index["weight_map"].items():  # same grouping: tensors that share a model shard share one here
        partners = {n for n, s in model_index.items() if s == model_index[name]} & set(index["weight_map"])
        assert {index["weight_map"][p] for p in partners} == {shard}


def save_full(model, fisher, model_dir, out):
    """A full-Fisher folder of ``fisher`` (tensor name -> values) for ``model``, saved in ``model_dir``."""
    shape = NodeShape.from_config(model.config)
    record = FullFisher(shape=shape, fingerprint="test", samples=1, estimator="empirical", loss="x", tensors=fisher,
                        shard_of=shard_map(model_dir))
    return record.save(out)


def make_full_fishers(tmp_path, models, zero_fraction=0.3):
    """Random positive Fishers with some exact zeros (to exercise the floor), written in the real format."""
    paths = []
    for k, model in enumerate(models):
        generator = torch.Generator().manual_seed(k)
        fisher = {}
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            values = 10 ** (6 * torch.rand(p.shape, generator=generator) - 9)
            values[torch.rand(p.shape, generator=generator) < zero_fraction] = 0
            fisher[name] = values
        directory = tmp_path / f"full{k}"
        model.save_pretrained(tmp_path / f"m{k}")
        save_full(model, fisher, tmp_path / f"m{k}", directory)
        paths.append((str(directory), fisher))
    return paths


@pytest.mark.parametrize("normalize, floor", [(True, 1e-6), (False, 1e-6), (False, 0.0)])
def test_fisher_merge_matches_formula(tmp_path, normalize, floor):
    from conftest import build_model

    models = [build_model("gpt2", seed=s) for s in range(3)]
    lambdas = [1.0, 2.0, 0.5]
    fishers = make_full_fishers(tmp_path, models)
    merged = merge_state_dicts(
        [m.state_dict() for m in models], FISHER,
        parameters={"fisher": [p for p, _ in fishers], "weight": lambdas, "fisher_floor": floor, "normalize": normalize},
    )
    norms = [torch.sqrt(sum((t.double() ** 2).sum() for t in f.values())) for _, f in fishers]
    for name, out in merged.items():
        if not out.is_floating_point():
            continue
        # One floor for every model: fisher_floor times the mean norm of the (normalized) Fishers; an entry zero in
        # every model takes the lambda mean.
        used = [f[name].double() / (n if normalize else 1) for (_, f), n in zip(fishers, norms)]
        common = floor * (1.0 if normalize else sum(norms) / len(norms))
        weights = [l * u.clamp_min(common) for l, u in zip(lambdas, used)]
        total = sum(weights)
        weights = [torch.where(total == 0, torch.tensor(l, dtype=torch.float64), w) for l, w in zip(lambdas, weights)]
        expected = sum(w * m.state_dict()[name] for w, m in zip(weights, models)) / sum(weights)
        torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("l2_norm, match", [(None, "l2_norm is missing"), ("abc", "not a number"),
                                             ("0.0", "finite, positive"), ("nan", "finite, positive")])
def test_a_bad_l2_norm_is_refused(tmp_path, l2_norm, match):
    from conftest import build_model

    from mergekit_fisher_mask.errors import FisherFileError

    (path, _), = make_full_fishers(tmp_path, [build_model("gpt2")])
    index_file = Path(path) / INDEX_NAME
    index = json.loads(index_file.read_text())
    index["metadata"].pop("l2_norm")
    if l2_norm is not None:
        index["metadata"]["l2_norm"] = l2_norm
    index_file.write_text(json.dumps(index))
    with pytest.raises(FisherFileError, match=match):
        FullFisherReader(path)


def test_a_negative_full_fisher_tensor_is_refused(tmp_path):
    from conftest import build_model

    from mergekit_fisher_mask.errors import FisherFileError

    model = build_model("gpt2")
    fisher = {name: torch.ones_like(p) for name, p in model.state_dict().items() if p.is_floating_point()}
    name = next(iter(fisher))
    fisher[name][0] = -1.0
    model.save_pretrained(tmp_path / "m")
    save_full(model, fisher, tmp_path / "m", tmp_path / "full")
    with pytest.raises(FisherFileError, match="negative values"):
        FullFisherReader(str(tmp_path / "full")).get(name)


def test_fisher_kernel_reads_only_the_tensor_it_merges(tmp_path, monkeypatch):
    """Peak memory stays near `linear`'s: each call reads one tensor per model and never a whole file."""
    from conftest import build_model

    models = [build_model("bert", seed=s) for s in range(2)]
    fishers = make_full_fishers(tmp_path, models)
    reads = []
    import mergekit_fisher_mask.files.base as sharded  # the one reader of every statistic folder

    real_safe_open = sharded.safe_open

    class RecordingHandle:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            reads.append(name)
            return self.handle.get_tensor(name)

        def keys(self):
            raise AssertionError("the kernel must not enumerate a Fisher shard")

    monkeypatch.setattr(sharded, "safe_open", lambda *a, **k: RecordingHandle(real_safe_open(*a, **k)))
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("whole-file load"))
    state = [m.state_dict() for m in models]
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    merge_state_dicts([{name: s[name]} for s in state], FISHER, parameters={"fisher": [p for p, _ in fishers]})
    assert reads == [name, name]


def test_fisher_method_end_to_end_with_calibration_data(model_zoo, text_data, tmp_path):
    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fisher",
        "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"calibration_data": str(text_data)}} for m in models],
        "calibration": {"samples": 6, "batch_size": 3},
        "parameters": {"fisher_floor": 1e-8},
    }))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(recipe), str(out), "--fisher-cache", str(tmp_path / "cache")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(list((tmp_path / "cache").glob("full-*/" + INDEX_NAME))) == 2
    assert "Fisher-weighted averaging" in (out / "README.md").read_text()
    assert load_file(next(out.glob("*.safetensors")))  # weights written


def test_cli_calibrate_full_writes_a_readable_folder(model_zoo, text_data, tmp_path):
    out = tmp_path / "full"
    result = CliRunner().invoke(main, ["calibrate", str(model_zoo("gpt2")), "--data", str(text_data), "--out", str(out),
                                       "--full", "--samples", "5", "--chunk-size", "2", "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    reader = FullFisherReader(str(out))
    assert reader.metadata["samples"] == "5" and reader.metadata["model_type"] == "gpt2"
    assert "transformer.h.0.attn.c_attn.weight" in reader and reader.l2_norm > 0


@pytest.mark.parametrize("normalize, floor", [(False, 1e-6), (True, 1e-6), (False, 0.0)])
def test_a_common_scale_of_every_full_fisher_changes_no_merge(tmp_path, normalize, floor):
    from conftest import build_model

    models = [build_model("gpt2", seed=s) for s in range(2)]
    fishers = make_full_fishers(tmp_path, models)
    scaled = []
    for k, (model, (_, fisher)) in enumerate(zip(models, fishers)):
        scaled.append(str(save_full(model, {n: v * 1e-6 for n, v in fisher.items()}, tmp_path / f"m{k}",
                                    tmp_path / f"scaled{k}")))
    states = [m.state_dict() for m in models]
    parameters = {"fisher_floor": floor, "normalize": normalize}
    plain = merge_state_dicts(states, FISHER, parameters={"fisher": [p for p, _ in fishers], **parameters})
    small = merge_state_dicts(states, FISHER, parameters={"fisher": scaled, **parameters})
    for name, value in plain.items():
        torch.testing.assert_close(small[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_a_version_1_folder_of_0_2_is_still_read_and_checked(model_zoo, text_data, tmp_path):
    """0.2.0 wrote full-Fisher folders without the node layout (format_version 1): they still merge, checked by
    model_type and fingerprint (their tensor shapes are checked as they are merged)."""
    from mergekit_fisher_mask.errors import FisherFileError

    model_dir = model_zoo("bert")
    out = tmp_path / "full"
    calibrate_full(str(model_dir), str(text_data), out, CalibrationSettings(samples=4), progress=False)
    index = json.loads((out / INDEX_NAME).read_text())
    meta = {k: v for k, v in index["metadata"].items() if k in ("format", "model_type", "fingerprint", "model",
                                                                "samples", "estimator", "loss", "dtype", "data",
                                                                "l2_norm")}
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {**meta, "format_version": "1"},
                                              "weight_map": index["weight_map"]}))
    old = FullFisher.read(out)
    assert old.shape is None and old.model_type == "bert" and old.samples == 4
    config = AutoModelForSequenceClassification.from_pretrained(model_dir).config
    old.check_matches_model(config, old.fingerprint, where="old")
    with pytest.raises(FisherFileError, match="measured on a different model"):
        old.check_matches_model(config, "st:other", where="old")
