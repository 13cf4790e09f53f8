"""Every output tensor of ``fisher_mask`` equals ``sum l F theta / sum l F`` computed by hand, for both schemes."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build_model
from mergekit.merge_methods import merge_state_dicts

import mergekit_fisher_mask
from mergekit_fisher_mask import FISHER_MASK, MaskFisher, NodeShape, save_mask_fisher
from mergekit_fisher_mask.errors import FisherMaskError


def write_fisher(path, model, seed, zero=False):
    shape = NodeShape.from_config(model.config)
    generator = torch.Generator().manual_seed(seed)
    # Log-uniform over four decades, like real Fisher values, so the weighting is far from uniform.
    head = 10 ** (4 * torch.rand(shape.num_layers, shape.num_heads, generator=generator) - 6)
    ffn = 10 ** (4 * torch.rand(shape.num_layers, shape.intermediate_size, generator=generator) - 6)
    if zero:
        head, ffn = torch.zeros_like(head), torch.zeros_like(ffn)
    fisher = MaskFisher(groups={"head_fisher": head, "ffn_fisher": ffn}, shape=shape, fingerprint="test", samples=1, estimator="empirical", loss="x")
    save_mask_fisher(fisher, path)
    return fisher


def normalized(values, normalize):
    if normalize == "none":
        return values
    mean = values.mean() if normalize == "model" else values.mean(dim=1, keepdim=True)
    return values / mean


# The expected weight of each tensor, written out per family independently of the package's table.
LAYER = {
    "bert": r"bert\.encoder\.layer\.(\d+)\.(.+)",
    "llama": r"model\.layers\.(\d+)\.(.+)",
    "gpt2": r"transformer\.h\.(\d+)\.(.+)",
}
EMBEDDING = {
    "bert": r"bert\.(embeddings\.(word|position|token_type)_embeddings\.weight|embeddings\.LayerNorm\..+|pooler\..+)",
    "llama": r"model\.embed_tokens\.weight",
    "gpt2": r"transformer\.(wte|wpe)\.weight",
}


def expected_weight(arch, name, shape, head, ffn, scheme, kv_heads, head_dim):
    """Full-size weight tensor (or None for 'no node covers it') for one model and one tensor."""
    paper = scheme == "paper"
    match = re.fullmatch(LAYER[arch], name)
    if match is None:
        if paper and re.fullmatch(EMBEDDING[arch], name):  # the authors' universal weight: mean(H) + mean(N)
            return torch.full(shape, float(head.mean(dim=1).mean() + ffn.mean(dim=1).mean()))
        return None
    layer, suffix = int(match[1]), match[2]
    h, n = head[layer], ffn[layer]
    kv = h.view(kv_heads, -1).sum(1)
    mean_h, mean_n = torch.full(shape, float(h.mean())), torch.full(shape, float(n.mean()))

    def rows(values, block):  # entry [r, ...] belongs to node r // block
        out = torch.empty(shape)
        for r in range(shape[0]):
            out[r] = values[r // block]
        return out

    def cols(values, block):  # entry [:, c] belongs to node c // block
        out = torch.empty(shape)
        for c in range(shape[1]):
            out[:, c] = values[c // block]
        return out

    if arch == "bert":
        table = {
            "attention.self.query": lambda: rows(h, head_dim),
            "attention.self.key": lambda: rows(kv, head_dim),
            "attention.self.value": lambda: mean_h if paper else rows(kv, head_dim),
            "intermediate.dense": lambda: rows(n, 1),
        }
        kind = suffix.rsplit(".", 1)[0]
        if kind in table:
            return table[kind]()
        if suffix == "attention.output.dense.weight":
            return mean_h if paper else cols(h, head_dim)
        if suffix == "output.dense.weight":
            return mean_n if paper else cols(n, 1)
        if suffix.startswith("attention.output."):  # dense.bias and LayerNorm
            return mean_h if paper else None
        if suffix.startswith("output."):
            return mean_n if paper else None
    if arch == "llama":
        if suffix in ("self_attn.q_proj.weight",):
            return rows(h, head_dim)
        if suffix == "self_attn.k_proj.weight":
            return rows(kv, head_dim)
        if suffix == "self_attn.v_proj.weight":
            return mean_h if paper else rows(kv, head_dim)
        if suffix == "self_attn.o_proj.weight":
            return mean_h if paper else cols(h, head_dim)
        if suffix in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            return rows(n, 1)
        if suffix == "mlp.down_proj.weight":
            return mean_n if paper else cols(n, 1)
        if suffix == "input_layernorm.weight":
            return mean_h if paper else None
        if suffix == "post_attention_layernorm.weight":
            return mean_n if paper else None
    if arch == "gpt2":
        fused = torch.cat([h, kv, torch.full_like(kv, float(h.mean())) if paper else kv])
        if suffix == "attn.c_attn.weight":
            return cols(fused, head_dim)
        if suffix == "attn.c_attn.bias":
            return rows(fused, head_dim)
        if suffix == "attn.c_proj.weight":  # Conv1D [in, out]: input rows are the heads
            return mean_h if paper else rows(h, head_dim)
        if suffix == "mlp.c_fc.weight":
            return cols(n, 1)
        if suffix == "mlp.c_fc.bias":
            return rows(n, 1)
        if suffix == "mlp.c_proj.weight":
            return mean_n if paper else rows(n, 1)
        if suffix in ("attn.c_proj.bias", "ln_1.weight", "ln_1.bias"):
            return mean_h if paper else None
        if suffix in ("mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"):
            return mean_n if paper else None
    raise AssertionError(f"test table has no entry for {name}")


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("scheme", ["nodes", "paper"])
@pytest.mark.parametrize("normalize", ["layer", "none"])
def test_every_tensor_matches_hand_computation(arch, scheme, normalize, tmp_path):
    models = [build_model(arch, seed=s) for s in range(3)]  # three models
    lambdas = [1.0, 0.5, 2.0]
    paths = [str(tmp_path / f"f{i}.safetensors") for i in range(3)]
    fishers = [write_fisher(p, m, seed=i) for i, (p, m) in enumerate(zip(paths, models))]
    merged = merge_state_dicts(
        [m.state_dict() for m in models],
        FISHER_MASK,
        parameters={"weight": lambdas, "fisher": paths, "scheme": scheme, "normalize": normalize},
    )
    shape = fishers[0].shape
    checked_weighted = 0
    for name, out in merged.items():
        thetas = [m.state_dict()[name] for m in models]
        weights = [
            expected_weight(arch, name, tuple(out.shape), normalized(f.groups["head_fisher"], normalize), normalized(f.groups["ffn_fisher"], normalize),
                            scheme, shape.num_kv_heads, shape.head_dim)
            for f in fishers
        ]
        if weights[0] is None:  # plain lambda-weighted average
            expected = sum(l * t for l, t in zip(lambdas, thetas)) / sum(lambdas)
        else:
            checked_weighted += 1
            weights = [l * w for l, w in zip(lambdas, weights)]  # no floor: the authors use none
            expected = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert checked_weighted >= 10


def test_model_normalization_and_gqa_sum(tmp_path):
    from mergekit_fisher_mask.merge.expand import NodeWeights, Normalize

    model = build_model("llama")
    fisher = write_fisher(tmp_path / "f.safetensors", model, seed=0)
    nodes = NodeWeights.from_fisher(fisher, Normalize.MODEL)
    torch.testing.assert_close(nodes.groups["head_fisher"].mean(), torch.tensor(1.0))
    torch.testing.assert_close(nodes.groups["ffn_fisher"].mean(), torch.tensor(1.0))
    # 4 query heads read 2 KV heads: heads {0, 1} -> KV 0 and {2, 3} -> KV 1.
    head = nodes.groups["head_fisher"]
    torch.testing.assert_close(nodes.kv_heads(head[0]), torch.stack([head[0, :2].sum(), head[0, 2:].sum()]))


def test_all_zero_fisher_falls_back_to_the_weighted_average(tmp_path):
    models = [build_model("bert", seed=s) for s in range(2)]
    paths = [str(tmp_path / f"f{i}.safetensors") for i in range(2)]
    for i, (p, m) in enumerate(zip(paths, models)):
        write_fisher(p, m, seed=i, zero=True)
    merged = merge_state_dicts([m.state_dict() for m in models], FISHER_MASK, parameters={"fisher": paths, "weight": [1.0, 3.0]})
    name = "bert.encoder.layer.0.attention.self.query.weight"
    expected = (models[0].state_dict()[name] + 3 * models[1].state_dict()[name]) / 4
    torch.testing.assert_close(merged[name], expected)
    assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())


def test_uncovered_base_takes_the_base_tensor(tmp_path):
    models = [build_model("llama", seed=s) for s in range(3)]
    paths = [str(tmp_path / f"f{i}.safetensors") for i in range(3)]
    for i, (p, m) in enumerate(zip(paths, models)):
        write_fisher(p, m, seed=i)
    merged = merge_state_dicts(
        [m.state_dict() for m in models], FISHER_MASK, base=0, parameters={"fisher": paths, "uncovered": "base"}
    )
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(merged[name], models[0].state_dict()[name])


def test_inputs_are_not_modified(tmp_path):
    models = [build_model("gpt2", seed=s) for s in range(2)]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    paths = [str(tmp_path / f"f{i}.safetensors") for i in range(2)]
    for i, (p, m) in enumerate(zip(paths, models)):
        write_fisher(p, m, seed=i)
    with torch.no_grad():
        merge_state_dicts([m.state_dict() for m in models], FISHER_MASK, parameters={"fisher": paths})
    for model, state in zip(models, states):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key])


def test_missing_fisher_and_bad_weights_are_clear_errors(tmp_path):
    models = [build_model("bert", seed=s) for s in range(2)]
    path = str(tmp_path / "f.safetensors")
    write_fisher(path, models[0], seed=0)
    with pytest.raises(FisherMaskError, match="missing for"):
        merge_state_dicts([m.state_dict() for m in models], FISHER_MASK, parameters={"fisher": [path, None]})
    with pytest.raises(FisherMaskError, match="sum to 0"):
        merge_state_dicts([m.state_dict() for m in models], FISHER_MASK, parameters={"fisher": [path, path], "weight": 0.0})


def test_importing_twice_registers_once():
    import importlib

    from mergekit import merge_methods

    importlib.reload(mergekit_fisher_mask)
    mergekit_fisher_mask.register()
    assert [m.spec.name for m in merge_methods.registered_methods()].count("fisher_mask") == 1


def test_paper_scheme_follows_the_authors_rules_on_a_hand_computed_example(tmp_path):
    """The authors' mapping (thennal10/fisher-nodes-merging, FisherNodeWrapper.apply) written out by hand for one
    BERT layer with 2 heads and 3 neurons: Q/K rows by head; V, attention output and its LayerNorm by the layer's mean
    head Fisher; intermediate rows by neuron (a neuron zero in both models: equal weights); FFN output and its
    LayerNorm by the mean neuron Fisher; embeddings and pooler by mean(H) + mean(N). No floor."""
    import transformers

    config = transformers.BertConfig(vocab_size=16, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=3, max_position_embeddings=8, num_labels=2)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(transformers.BertForSequenceClassification(config).eval())
        models[-1].config.architectures = ["BertForSequenceClassification"]
    shape = NodeShape.from_config(models[0].config)
    fishers = {"a": ([[1.0, 3.0]], [[2.0, 0.0, 4.0]]), "b": ([[3.0, 1.0]], [[2.0, 0.0, 0.0]])}
    paths = []
    for key, (head, ffn) in fishers.items():
        paths.append(str(tmp_path / f"{key}.safetensors"))
        save_mask_fisher(MaskFisher(groups={"head_fisher": torch.tensor(head), "ffn_fisher": torch.tensor(ffn)},
                                    shape=shape, samples=1, estimator="batch", loss="cross_entropy"), paths[-1])
    a, b = (m.state_dict() for m in models)
    merged = merge_state_dicts([a, b], FISHER_MASK, parameters={"fisher": paths, "scheme": "paper", "normalize": "none"})

    def mix(name, weight_a, weight_b, rows=slice(None)):
        expected = (weight_a * a[name][rows] + weight_b * b[name][rows]) / (weight_a + weight_b)
        torch.testing.assert_close(merged[name][rows], expected, msg=f"{name}[{rows}]")

    layer = "bert.encoder.layer.0."
    for part in ("attention.self.query", "attention.self.key"):
        for suffix in ("weight", "bias"):
            mix(layer + f"{part}.{suffix}", 1, 3, slice(0, 2))  # head 0: F_A 1, F_B 3
            mix(layer + f"{part}.{suffix}", 3, 1, slice(2, 4))  # head 1: F_A 3, F_B 1
    for name in ("attention.self.value.weight", "attention.self.value.bias", "attention.output.dense.weight",
                 "attention.output.dense.bias", "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias"):
        mix(layer + name, 2, 2)  # the layer's mean head Fisher: 2 and 2
    for suffix in ("weight", "bias"):
        mix(layer + f"intermediate.dense.{suffix}", 2, 2, slice(0, 1))
        mix(layer + f"intermediate.dense.{suffix}", 1, 1, slice(1, 2))  # zero in both models: equal weights
        mix(layer + f"intermediate.dense.{suffix}", 4, 0, slice(2, 3))
    for name in ("output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"):
        mix(layer + name, 2, 2 / 3)  # the layer's mean neuron Fisher: 2 and 2/3
    for name in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight", "bert.pooler.dense.weight"):
        mix(name, 2 + 2, 2 + 2 / 3)  # mean(H) + mean(N)


@pytest.mark.parametrize("scheme", ["nodes", "paper"])
@pytest.mark.parametrize("normalize", ["none", "model", "layer"])
@pytest.mark.parametrize("options", [{}, {"epsilon": 1e-3}, {"sparsify": "magnitude", "density": 0.5}])
def test_a_common_scale_of_every_fisher_changes_no_merge(scheme, normalize, options, tmp_path):
    models = [build_model("llama", seed=s) for s in range(3)]
    states = [m.state_dict() for m in models]
    merges = []
    for scale in (1.0, 1e-7):
        paths = []
        for i, model in enumerate(models[1:]):
            fisher = write_fisher(tmp_path / f"f{i}.safetensors", model, seed=i)
            scaled = MaskFisher(groups={k: v * scale for k, v in fisher.groups.items()}, shape=fisher.shape, samples=1,
                                estimator="batch", loss="x")
            paths.append(str(tmp_path / f"s{scale}-{i}.safetensors"))
            save_mask_fisher(scaled, paths[-1])
        merges.append(merge_state_dicts(states, FISHER_MASK, base=0, parameters={
            "fisher": [None, *paths], "scheme": scheme, "normalize": normalize, **options}))
    for name, value in merges[0].items():
        torch.testing.assert_close(merges[1][name], value, rtol=1e-5, atol=1e-7, msg=name)
