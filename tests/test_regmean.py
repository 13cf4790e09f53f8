"""RegMean: Gram calibration and the ``regmean`` merge against an independent float64 reference, its invariants,
placement, bad input and the command line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from click.testing import CliRunner
from conftest import ARCHS, data_for, load_reference_model, reference_examples
from mergekit.merge_methods import merge_state_dicts
from mergekit.options import MergeOptions

from mergekit_fisher_mask import REGMEAN, CalibrationSettings, GramStats, calibrate_gram
from mergekit_fisher_mask.architectures import get_architecture
from mergekit_fisher_mask.cli import main
from mergekit_fisher_mask.errors import FisherFileError, FisherMaskError
from mergekit_fisher_mask.pipeline import run_fisher_merge

SETTINGS = CalibrationSettings(samples=10, batch_size=4, max_length=64)  # no example is truncated
FAMILIES = sorted(arch for arch in ARCHS if all(s.grams for s in get_architecture(ARCHS[arch][0]().model_type).stacks))


def floats(model) -> dict:
    """The float tensors a checkpoint holds (tied aliases left out, as save_pretrained leaves them out)."""
    state, seen = {}, set()
    for name, value in model.state_dict().items():
        if value.is_floating_point() and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            state[name] = value
    return state


def reference_inputs(model_dir, data, samples):
    """Every linear layer's token inputs, found by module type (not from the table), one example at a time in float64
    without padding: {module name: (N, d_in)} and the model. Calls on anything but the example's tokens (DeBERTa
    projects its position embeddings with the same modules) are left out."""
    model = load_reference_model(model_dir)
    try:  # float64 where the model's kernels have it (fused MoE experts do not: float32 activations, float64 sums)
        model.double()(**reference_examples(model_dir, data, 1)[0][0])
    except RuntimeError:
        model.float()
    captured, handles, length = {}, [], [0]

    def capture(module, args, name):
        x = args[0]
        if x.shape[:2] == (1, length[0]) or x.dim() == 2 and x.shape[0] == length[0]:  # (1, T, d) or flattened (T, d)
            captured.setdefault(name, []).append(x.reshape(length[0], -1).double())

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, transformers.pytorch_utils.Conv1D)):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: capture(m, args, name)))
    with torch.no_grad():
        for inputs, _ in reference_examples(model_dir, data, samples):
            length[0] = inputs["input_ids"].shape[1]
            model(**inputs)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(rows) for name, rows in captured.items()}, model


@pytest.mark.parametrize("arch", FAMILIES)
def test_grams_and_merge_equal_an_independent_least_squares_reference(arch, model_zoo, tmp_path):
    """Calibration equals X^T X of explicit float64 activations; the merge (alpha 1, no ridge) fits the stacked,
    per-token-weighted inputs of both models as well as ``lstsq`` does (compared on their outputs: a LayerNorm's
    outputs span one dimension less than its width, so the weights themselves are not unique)."""
    data = data_for(arch, tmp_path)
    dirs = [model_zoo(arch, seed=s) for s in (1, 2)]
    grams = [calibrate_gram(str(d), str(data), tmp_path / f"g{k}", SETTINGS, progress=False) for k, d in enumerate(dirs)]
    references = [reference_inputs(d, data, SETTINGS.samples) for d in dirs]
    for record, (inputs, _) in zip(grams, references):
        assert record.inputs, "a supported family measures at least one input"
        for name, entry in record.inputs.items():
            expected = inputs[name]  # (N, d)
            assert entry.tokens == expected.shape[0]
            torch.testing.assert_close(record.grams[name].double(), expected.T @ expected, rtol=2e-5, atol=1e-4)
            for weight in entry.weights:  # every weight said to read this input really does
                module = weight.removesuffix(".weight")
                torch.testing.assert_close(inputs[module], expected, rtol=1e-7, atol=1e-9)
    lambdas = [1.0, 2.0]
    states = [floats(load_reference_model(d)) for d in dirs]
    merged = merge_state_dicts(states, REGMEAN, parameters={"gram": [str(tmp_path / "g0"), str(tmp_path / "g1")],
                                                            "weight": lambdas, "alpha": 1.0, "ridge": 0.0})
    checked = 0
    for name, entry in grams[0].inputs.items():
        rows = [(lam / inputs[name].shape[0]) ** 0.5 * inputs[name] for lam, (inputs, _) in zip(lambdas, references)]
        for weight in entry.weights:
            targets = []
            for row, state in zip(rows, states):
                w = state[weight].double()
                targets.append(row @ (w.T if entry.input_axis == 1 else w))  # (N, out)
            stacked, wanted = torch.cat(rows), torch.cat(targets)  # (sum_k N_k, in), (sum_k N_k, out)
            solution = torch.linalg.lstsq(stacked, wanted, driver="gelsd").solution  # (in, out)
            got = merged[weight].double()
            got = got.T if entry.input_axis == 1 else got  # (in, out)
            # The RegMean objective sum_k l_k / N_k ||X_k (W - W_k)^T||^2: ours reaches the least-squares minimum, up
            # to what float32 Gram sums of ill-conditioned inputs allow (a wrong formula misses by a large fraction).
            best, ours = ((stacked @ solution - wanted) ** 2).sum(), ((stacked @ got - wanted) ** 2).sum()
            assert ours - best <= 1e-3 * best + 1e-3 * (wanted**2).sum(), (weight, float(ours), float(best))
            checked += 1
    assert checked >= 4


def write_grams(tmp_path, model, name, scale=1.0, seed=0):
    """A Gram folder of random positive-definite matrices for ``model`` (independent of calibration)."""
    from mergekit_fisher_mask import NodeShape
    from mergekit_fisher_mask.files.gram import GramInput

    spec = get_architecture(model.config.model_type)
    generator = torch.Generator().manual_seed(seed)
    grams, inputs = {}, {}
    for stack in spec.stacks:
        for layer in range(model.config.num_hidden_layers):
            prefix = f"model.{stack.layers}.{layer}"
            for gram in stack.grams.values():
                module = model.get_submodule(f"{prefix}.{gram.module}")
                width = module.weight.shape[gram.input_axis]
                x = torch.randn(4 * width, width, generator=generator)
                grams[f"{prefix}.{gram.module}"] = scale * (x.T @ x)
                inputs[f"{prefix}.{gram.module}"] = GramInput(4 * width, tuple(f"{prefix}.{w}" for w in gram.weights),
                                                              gram.input_axis)
    record = GramStats(shape=NodeShape.from_config(model.config), samples=1, estimator="forward", grams=grams,
                       inputs=inputs)
    record.save(tmp_path / name)
    return str(tmp_path / name), record


@pytest.fixture
def llamas(tmp_path):
    from conftest import build_model

    models = [build_model("llama", seed=s) for s in (1, 2)]
    return models, [floats(m) for m in models]


def test_merging_a_model_with_itself_gives_the_model(llamas, tmp_path):
    models, states = llamas
    path, _ = write_grams(tmp_path, models[0], "g")
    merged = merge_state_dicts([states[0], states[0]], REGMEAN, parameters={"gram": [path, path], "weight": [1.0, 3.0]})
    for name, value in states[0].items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_alpha_zero_is_the_per_input_channel_weighted_mean(llamas, tmp_path):
    models, states = llamas
    paths = [write_grams(tmp_path, m, f"g{k}", seed=k) for k, m in enumerate(models)]
    lambdas = [1.0, 0.5]
    merged = merge_state_dicts(states, REGMEAN, parameters={"gram": [p for p, _ in paths], "weight": lambdas,
                                                            "alpha": 0.0, "ridge": 0.0})
    name = "model.layers.1.mlp.down_proj.weight"  # [out, in]: channel i is column i
    diagonals = [record.mean(record.gram_for(name), where="").diagonal() for _, record in paths]
    expected = sum(l * d * s[name] for l, d, s in zip(lambdas, diagonals, states)) / sum(l * d for l, d in zip(lambdas, diagonals))
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_a_much_larger_gram_dominates_and_a_common_scale_changes_nothing(llamas, tmp_path):
    models, states = llamas
    small, _ = write_grams(tmp_path, models[0], "small", seed=0)
    large, _ = write_grams(tmp_path, models[1], "large", scale=1000.0, seed=1)
    merged = merge_state_dicts(states, REGMEAN, parameters={"gram": [small, large]})
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[name] - states[1][name]).abs().max() < 0.02 * (states[0][name] - states[1][name]).abs().max()
    both = [write_grams(tmp_path, m, f"x{k}", scale=s, seed=k)[0] for k, (m, s) in enumerate(zip(models, (7.0, 7.0)))]
    plain = [write_grams(tmp_path, m, f"y{k}", seed=k)[0] for k, m in enumerate(models)]
    scaled = merge_state_dicts(states, REGMEAN, parameters={"gram": both})
    unscaled = merge_state_dicts(states, REGMEAN, parameters={"gram": plain})
    for key in unscaled:
        torch.testing.assert_close(scaled[key], unscaled[key], rtol=1e-5, atol=1e-6)


def test_a_singular_sum_is_solved_with_a_ridge_and_reported(llamas, tmp_path, caplog):
    models, states = llamas
    path, record = write_grams(tmp_path, models[0], "g")
    name = "model.layers.0.self_attn.q_proj"
    rank_one = torch.ones(record.grams[name].shape)  # every token the same: rank 1
    singular = GramStats(**{**record.__dict__, "grams": {**record.grams, name: rank_one}})
    singular.save(tmp_path / "singular")
    with caplog.at_level(logging.WARNING):
        merged = merge_state_dicts(states, REGMEAN, parameters={"gram": [str(tmp_path / "singular")] * 2, "ridge": 0.0,
                                                                "alpha": 1.0})  # alpha < 1 adds a diagonal
    assert "is singular at ridge 0" in caplog.text and torch.isfinite(merged[f"{name}.weight"]).all()


def test_bad_gram_folders_are_refused(llamas, model_zoo, tmp_path):
    models, states = llamas
    path, record = write_grams(tmp_path, models[0], "g")
    shard = next(Path(path).glob("gram-*.safetensors"))
    truncated = tmp_path / "truncated"
    record.save(truncated)
    victim = next(truncated.glob("gram-*.safetensors"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(FisherFileError, match="(?i)is (it|the file) truncated"):
        merge_state_dicts(states, REGMEAN, parameters={"gram": [path, str(truncated)]})
    name = next(iter(record.inputs))
    poisoned = {**record.grams, name: record.grams[name].clone().fill_(float("nan"))}
    GramStats(**{**record.__dict__, "grams": poisoned}).save(tmp_path / "nan")
    with pytest.raises(FisherFileError, match="contains NaN"):
        merge_state_dicts(states, REGMEAN, parameters={"gram": [path, str(tmp_path / "nan")]})
    assert shard.is_file()
    # Another model's, or another layout's: refused by the merge's checks before anything is written.
    data = data_for("llama", tmp_path)
    dirs = [model_zoo("llama", seed=s) for s in (1, 2)]
    calibrate_gram(str(dirs[0]), str(data), tmp_path / "mine", SETTINGS, progress=False)
    calibrate_gram(str(model_zoo("llama", seed=3)), str(data), tmp_path / "other", SETTINGS, progress=False)
    calibrate_gram(str(model_zoo("llama", seed=4, num_hidden_layers=3)), str(data), tmp_path / "deeper", SETTINGS,
                   progress=False)
    for wrong, match in (("other", "measured on a different model"), ("deeper", "num_layers: file 3 vs model 2")):
        recipe = tmp_path / f"{wrong}.yml"
        recipe.write_text(yaml.safe_dump({"merge_method": "regmean", "base_model": str(dirs[0]), "models": [
            {"model": str(dirs[0]), "parameters": {"gram": str(tmp_path / "mine")}},
            {"model": str(dirs[1]), "parameters": {"gram": str(tmp_path / wrong)}}]}))
        with pytest.raises(FisherMaskError, match=match):
            run_fisher_merge(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))
        assert not (tmp_path / "out").exists()


def test_offloaded_and_two_process_grams_equal_the_in_memory_ones(model_zoo, tmp_path):
    model = model_zoo("llama", num_hidden_layers=4)
    data = data_for("llama", tmp_path)
    single = calibrate_gram(str(model), str(data), tmp_path / "one", SETTINGS, progress=False)
    offloaded = calibrate_gram(str(model), str(data), tmp_path / "offload",
                               CalibrationSettings(**{**SETTINGS.model_dump(exclude_unset=True), "device_map": "auto",
                                                      "max_memory": "cpu=60KB", "offload_folder": str(tmp_path / "w")}),
                               progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mergekit_fisher_mask"]
    subprocess.run([*launch, "calibrate", str(model), "--data", str(data), "--gram", "--out", str(tmp_path / "two"),
                    "--samples", "10", "--batch-size", "4", "--max-length", "64", "--quiet"], check=True, env=env)
    two = GramStats.read(tmp_path / "two")
    assert two.data["processes"] == 2
    for other in (offloaded, two):
        for name, entry in single.inputs.items():
            assert other.inputs[name].tokens == entry.tokens
            torch.testing.assert_close(other.grams[name], single.grams[name], rtol=1e-5, atol=1e-5)


def test_regmean_from_a_recipe_with_calibration_data(model_zoo, tmp_path):
    from transformers import AutoModelForSequenceClassification

    models = [model_zoo("bert", seed=s) for s in (1, 2)]
    data = data_for("bert", tmp_path)
    recipe = tmp_path / "regmean.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "regmean", "base_model": str(models[0]), "parameters": {"alpha": 0.6},
        "models": [{"model": str(m), "parameters": {"calibration_data": str(data)}} for m in models],
        "calibration": {"samples": 8, "batch_size": 4, "gram_inputs": ["attn_in", "ffn_in"]},
    }))
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(recipe), str(out), "--fisher-cache", str(tmp_path / "cache")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    _, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cached = list((tmp_path / "cache").glob("gram-*"))
    assert len(cached) == 2 and {n.rsplit(".", 1)[-1] for n in GramStats.read(cached[0]).inputs} == {"query", "dense"}
    card = (out / "README.md").read_text()
    assert "[RegMean](https://arxiv.org/abs/2212.09849)" in card and "Gram matrices over" in card
    report = CliRunner().invoke(main, ["inspect", str(cached[0])], catch_exceptions=False)
    assert "eff. rank" in report.output and "attention.self.query" in report.output


def test_families_without_a_gram_pass_are_refused_before_any_work(model_zoo, tmp_path):
    with pytest.raises(FisherMaskError, match="RegMean \\(--gram\\) is not implemented for T5"):
        calibrate_gram(str(model_zoo("t5")), str(data_for("t5", tmp_path)), tmp_path / "g", SETTINGS)
    assert not (tmp_path / "g").exists()


def test_grams_need_no_labels_and_record_a_forward_statistic(model_zoo, tmp_path):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "unlabelled.jsonl", [{"text": "w1 w2 w3"}, {"text": "w4 w5"}] * 4)
    grams = calibrate_gram(str(model_zoo("bert")), str(data), tmp_path / "g", SETTINGS, progress=False)
    assert grams.estimator == "forward" and grams.loss == "" and grams.samples == 8


def test_scale_multiplies_the_change_from_the_base(llamas, tmp_path):
    from conftest import build_model

    models, states = llamas
    base = floats(build_model("llama", seed=9))
    paths = [write_grams(tmp_path, m, f"g{k}", seed=k)[0] for k, m in enumerate(models)]
    parameters = {"gram": {"base": None, "a": paths[0], "b": paths[1]}}
    inputs = {"base": base, "a": states[0], "b": states[1]}
    plain = merge_state_dicts(inputs, REGMEAN, base="base", parameters=parameters)
    scaled = merge_state_dicts(inputs, REGMEAN, base="base", parameters={**parameters, "scale": 1.5})
    for name in plain:
        torch.testing.assert_close(scaled[name], base[name] + 1.5 * (plain[name] - base[name]), rtol=1e-5, atol=1e-6)
    with pytest.raises(FisherMaskError, match="scale multiplies the merge's change from the base model"):
        merge_state_dicts(states, REGMEAN, parameters={"gram": paths, "scale": 1.5})


def test_one_pass_measures_the_mask_fisher_and_the_grams_of_two_passes(model_zoo, tmp_path):
    from mergekit_fisher_mask import MaskFisher, calibrate

    model = model_zoo("llama", num_hidden_layers=4)
    data = data_for("llama", tmp_path)
    mask = calibrate(str(model), str(data), tmp_path / "mask.safetensors", SETTINGS, progress=False)
    grams = calibrate_gram(str(model), str(data), tmp_path / "grams", SETTINGS, progress=False)
    offload = CalibrationSettings(**{**SETTINGS.model_dump(exclude_unset=True), "device_map": "auto",
                                     "max_memory": "cpu=60KB", "offload_folder": str(tmp_path / "w")})
    for name, settings in (("memory", SETTINGS), ("offloaded", offload)):  # offloaded: layers recomputed in backward
        joint = calibrate(str(model), str(data), tmp_path / f"{name}.safetensors", settings, progress=False,
                          gram_out=tmp_path / f"{name}-grams")
        assert MaskFisher.read(tmp_path / f"{name}.safetensors").samples == joint.samples == mask.samples
        for key, value in mask.groups.items():
            torch.testing.assert_close(joint.groups[key], value, rtol=1e-5, atol=1e-9)
        together = GramStats.read(tmp_path / f"{name}-grams")
        assert together.estimator == "forward" and together.samples == grams.samples
        for key, entry in grams.inputs.items():
            assert together.inputs[key].tokens == entry.tokens  # each real token counted once
            torch.testing.assert_close(together.grams[key], grams.grams[key], rtol=1e-5, atol=1e-5)


def test_gram_out_is_checked_like_out_before_any_work(model_zoo, tmp_path):
    from mergekit_fisher_mask import calibrate

    model = model_zoo("llama")
    data = data_for("llama", tmp_path)
    with pytest.raises(FisherMaskError, match="output .* is the Gram output"):
        calibrate(str(model), str(data), tmp_path / "same", SETTINGS, gram_out=tmp_path / "same")
    with pytest.raises(FisherMaskError, match="Gram output .* lies inside the model folder"):
        calibrate(str(model), str(data), tmp_path / "m.safetensors", SETTINGS, gram_out=model / "grams")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = CliRunner().invoke(main, ["calibrate", str(model), "--data", str(data), "--out",
                                       str(tmp_path / "m.safetensors"), "--gram-out", str(tmp_path / "mine")])
    assert result.exit_code != 0 and "--gram-out" in str(result.exception or result.output)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (tmp_path / "m.safetensors").exists()
    result = CliRunner().invoke(main, ["calibrate", str(model), "--data", str(data), "--full", "--out",
                                       str(tmp_path / "f"), "--gram-out", str(tmp_path / "g")])
    assert "--gram-out adds the Gram matrices to a mask-Fisher run; with --full" in str(result.exception)
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
