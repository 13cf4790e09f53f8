"""The merge options beyond the paper, each against a hand-written formula: power, task vectors (sparsify, density,
consensus), the mean-Fisher rule for uncovered tensors, and the normalized per-example aggregate."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, data_for, reference_examples, reference_gradients_of
from mergekit.merge_methods import merge_state_dicts
from test_families import write_fisher

from mergekit_fisher_mask import FISHER_MASK, CalibrationSettings, FisherMaskError, NodeShape, calibrate

NAME = "model.layers.1.self_attn.q_proj.weight"  # rows by query head (head_dim 8)
DOWN = "model.layers.0.mlp.down_proj.weight"  # columns by neuron
NORM = "model.layers.1.input_layernorm.weight"  # uncovered: the attention block's norm


@pytest.fixture
def setup(tmp_path):
    models = [build_model("llama", seed=s) for s in range(3)]  # model 0 is the base
    shape = NodeShape.from_config(models[0].config)
    paths = [str(tmp_path / f"f{i}.safetensors") for i in range(3)]
    fishers = [write_fisher(p, shape, seed=i) for i, p in enumerate(paths)]
    states = [{k: v for k, v in m.state_dict().items() if v.is_floating_point()} for m in models]
    return states, fishers, paths


def head_rows(fisher, layer=1, head_dim=8):
    return fisher.groups["head_fisher"][layer].repeat_interleave(head_dim)[:, None]  # (H * d, 1)


def merge(states, paths, **parameters):
    return merge_state_dicts(states, FISHER_MASK, base=0, parameters={"fisher": [None, *paths[1:]], **parameters})


def test_power_raises_fisher_to_a_power(setup):
    states, fishers, paths = setup
    for power in (0.0, 0.5, 2.0):
        merged = merge(states, paths, power=power, normalize="none")
        weights = [head_rows(f) ** power for f in fishers[1:]]  # no floor by default
        expected = sum(w * s[NAME] for w, s in zip(weights, states[1:])) / sum(weights)
        torch.testing.assert_close(merged[NAME], expected, rtol=1e-5, atol=1e-6)
    plain = merge(states, paths, power=0.0)  # power 0: every node alike, which is `linear`
    torch.testing.assert_close(plain[DOWN], (states[1][DOWN] + states[2][DOWN]) / 2)


def reference_ties(base, tensors, weights, density, by_fisher):
    """TIES written out entry by entry: trim per model, elect the sign of the weighted sum, mean of agreeing."""
    deltas = []
    for tensor, weight in zip(tensors, weights):
        delta = tensor - base
        score = (delta.abs() * weight if by_fisher else delta.abs()).flatten()
        keep = round(density * score.numel())
        threshold = score.sort(descending=True).values[keep - 1]
        deltas.append(delta * (score >= threshold).view(delta.shape))
    sign = torch.sign(sum(w * d for w, d in zip(weights, deltas)))
    numerator, denominator = torch.zeros_like(base), torch.zeros_like(base)
    for weight, delta in zip(weights, deltas):
        agree = ((torch.sign(delta) == sign) & (delta != 0)).float() * weight
        numerator += agree * delta
        denominator += agree
    return base + torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(base))


@pytest.mark.parametrize("method", ["magnitude", "fisher"])
def test_sparsified_task_vectors_match_ties_written_out(setup, method):
    states, fishers, paths = setup
    merged = merge(states, paths, sparsify=method, density=0.3, normalize="none", weight=[1.0, 1.0, 2.0])
    weights = [lam * head_rows(f) for lam, f in zip((1.0, 2.0), fishers[1:])]
    expected = reference_ties(states[0][NAME], [s[NAME] for s in states[1:]], [w.expand_as(states[0][NAME]) for w in weights],
                              0.3, method == "fisher")
    torch.testing.assert_close(merged[NAME], expected, rtol=1e-5, atol=1e-6)
    # Uncovered tensors take part with their model weights alone.
    expected_norm = reference_ties(states[0][NORM], [s[NORM] for s in states[1:]],
                                   [torch.full_like(states[0][NORM], w) for w in (1.0, 2.0)], 0.3, False)
    torch.testing.assert_close(merged[NORM], expected_norm, rtol=1e-5, atol=1e-6)


def test_density_one_without_consensus_is_the_weighted_mean(setup):
    states, fishers, paths = setup
    merged = merge(states, paths, sparsify="magnitude", density=1.0, consensus=False, normalize="none")
    weights = [head_rows(f) for f in fishers[1:]]
    expected = sum(w * s[NAME] for w, s in zip(weights, states[1:])) / sum(weights)
    torch.testing.assert_close(merged[NAME], expected, rtol=1e-5, atol=1e-6)


def test_scale_and_magnitude_power_act_on_the_task_vectors(setup):
    states, fishers, paths = setup
    base = states[0][NAME]
    taus = [s[NAME] - base for s in states[1:]]
    weights = [head_rows(f) for f in fishers[1:]]
    scaled = merge(states, paths, sparsify="magnitude", density=1.0, consensus=False, normalize="none", scale=2.0)
    mean = sum(w * t for w, t in zip(weights, taus)) / sum(weights)
    torch.testing.assert_close(scaled[NAME], base + 2.0 * mean, rtol=1e-5, atol=1e-6)
    soft = merge(states, paths, sparsify="magnitude", density=1.0, consensus=False, normalize="none",
                 magnitude_power=1.0)
    soft_weights = [w * t.abs() for w, t in zip(weights, taus)]  # each entry also weighted by its |tau_k|
    expected = base + sum(w * t for w, t in zip(soft_weights, taus)) / sum(soft_weights)
    torch.testing.assert_close(soft[NAME], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(FisherMaskError, match="scale and magnitude_power act on task vectors"):
        merge(states, paths, scale=2.0)


def test_layer_median_normalization_scales_each_layer_to_median_one(setup):
    from mergekit_fisher_mask.merge.expand import NodeWeights, Normalize

    _, fishers, _ = setup
    nodes = NodeWeights.from_fisher(fishers[1], Normalize.LAYER_MEDIAN)
    for key, values in nodes.groups.items():
        torch.testing.assert_close(values.median(dim=1).values, torch.ones(values.shape[0]), msg=key)
        ratio = fishers[1].groups[key] / values  # one positive factor per layer
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), msg=key)


def test_dare_keeps_about_density_and_rescales(setup):
    states, _, paths = setup
    merged = merge(states, paths, sparsify="dare", density=0.5, consensus=False)
    again = merge(states, paths, sparsify="dare", density=0.5, consensus=False)
    torch.testing.assert_close(merged[NAME], again[NAME])  # reproducible per tensor
    changed = (merged[NAME] != states[0][NAME]).float().mean()
    assert 0.6 < changed < 0.9, "about 1 - 0.5^2 of the entries keep some model's change"


def test_sparsify_needs_a_base_model(setup):
    states, _, paths = setup
    with pytest.raises(FisherMaskError, match="needs a base_model"):
        merge_state_dicts(states[1:], FISHER_MASK, parameters={"fisher": paths[1:], "sparsify": "magnitude"})


def test_mean_fisher_rule_for_uncovered_tensors(setup):
    states, fishers, paths = setup
    merged = merge(states, paths, uncovered="mean_fisher", normalize="none")
    weights = [float(f.groups["head_fisher"][1].mean()) for f in fishers[1:]]  # the attention block's norm: its layer's mean head F
    expected = sum(w * s[NORM] for w, s in zip(weights, states[1:])) / sum(weights)
    torch.testing.assert_close(merged[NORM], expected)
    embed = "model.embed_tokens.weight"
    # The authors' universal weight: the mean over layers of (mean head Fisher + mean neuron Fisher).
    means = [float(f.groups["head_fisher"].mean() + f.groups["ffn_fisher"].mean()) for f in fishers[1:]]
    expected = sum(w * s[embed] for w, s in zip(means, states[1:])) / sum(means)
    torch.testing.assert_close(merged[embed], expected)


def test_normalized_aggregate_weighs_every_example_alike(model_zoo, tmp_path):
    model_dir = model_zoo("bert")
    data = data_for("bert", tmp_path)
    fisher = calibrate(str(model_dir), str(data), tmp_path / "f.safetensors",
                       CalibrationSettings(samples=10, batch_size=4, aggregate="normalized"), progress=False)
    grads, _ = reference_gradients_of(model_dir, reference_examples(model_dir, data, 10))
    totals = [sum(float((g[key] ** 2).sum()) for key in g) for g in grads]
    for key in fisher.groups:
        expected = torch.stack([g[key] ** 2 / t for g, t in zip(grads, totals)]).mean(0)
        torch.testing.assert_close(fisher.groups[key], expected, rtol=1e-4, atol=0)


def test_normalized_aggregate_needs_per_example_gradients():
    with pytest.raises(ValueError, match="aggregate normalized needs per-example gradients"):
        CalibrationSettings(aggregate="normalized", estimator="batch")
