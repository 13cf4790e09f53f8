"""Every family, through the merge kernel: a hand-written formula per tensor, dominance, experts, refused configs.

The expected weights here are written out per family from the models' own layouts (rows and columns by head or
neuron, fused blocks, experts), independently of the package's architecture table.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from conftest import ARCHS, build_model, save_model
from mergekit.merge_methods import merge_state_dicts

from mergekit_fisher_mask import FISHER_MASK, MaskFisher, NodeShape, UnsupportedArchitectureError, save_mask_fisher
from mergekit_fisher_mask.architectures import get_architecture


def write_fisher(path, shape: NodeShape, seed: int, fill=None) -> MaskFisher:
    generator = torch.Generator().manual_seed(seed)
    groups = {}
    for key, size in shape.group_shapes().items():
        # Log-uniform over four decades, like real Fisher values, so the weighting is far from uniform.
        groups[key] = torch.full(size, fill) if fill is not None else 10 ** (4 * torch.rand(size, generator=generator) - 6)
    fisher = MaskFisher(groups=groups, shape=shape, fingerprint="test", samples=1, estimator="empirical", loss="x")
    save_mask_fisher(fisher, path)
    return fisher


def floats(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


# --- the hand-written layouts ------------------------------------------------------------------------------------

def rows(shape, values):
    """A tensor whose entry [r, ...] is values[r]."""
    return torch.tensor(values).view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def cols(shape, values):
    return torch.tensor(values).view(*([1] * (len(shape) - 1)), -1).expand(shape).clone()


def per(values, block):
    """Each node's value repeated over the ``block`` entries it owns."""
    return [float(v) for v in values for _ in range(block)]


LAYER = re.compile(r"(?:.+\.)?(?:layers|layer|h|block)\.(\d+)\.(.+)")
T5_LAYER = re.compile(r"(encoder|decoder)\.block\.(\d+)\.(.+)")
LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "up": ("mlp.gate_proj", "mlp.up_proj"), "down": "mlp.down_proj"}
NAMES = {
    "bert": {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "up": ("intermediate.dense",), "down": "output.dense"},
    "distilbert": {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
                   "up": ("ffn.lin1",), "down": "ffn.lin2"},
    "deberta-v2": {"q": "attention.self.query_proj", "k": "attention.self.key_proj", "v": "attention.self.value_proj",
                   "o": "attention.output.dense", "up": ("intermediate.dense",), "down": "output.dense"},
    "starcoder2": {**LLAMA, "up": ("mlp.c_fc",), "down": "mlp.c_proj"},
    "phi": {**LLAMA, "o": "self_attn.dense", "up": ("mlp.fc1",), "down": "mlp.fc2"},
    "gpt_neox": {"o": "attention.dense", "up": ("mlp.dense_h_to_4h",), "down": "mlp.dense_4h_to_h"},
    "modernbert": {"o": "attn.Wo", "down": "mlp.Wo"},
    "phi3": {"o": "self_attn.o_proj", "down": "mlp.down_proj"},
    "qwen2_moe": {**LLAMA, "up": ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                  "down": "mlp.shared_expert.down_proj"},
    "mixtral": {k: LLAMA[k] for k in "qkvo"},
}
NAMES["qwen3_moe"] = NAMES["mixtral"]
NAMES["bert-tokens"] = NAMES["bert-qa"] = NAMES["bert"]
NAMES["gpt_neox-lm"] = NAMES["gpt_neox"]


def expected_weight(arch, name, size, groups, shape: NodeShape):
    """The full-size weight of one model for one tensor under scheme "nodes", or None for the plain average."""
    hd, kv_heads = shape.head_dim, shape.num_kv_heads
    match = T5_LAYER.fullmatch(name)
    if match:
        stack, layer, suffix = match[1], int(match[2]), match[3]
        cross = suffix.startswith("layer.1.EncDecAttention")
        h = groups[f"{stack}_{'cross_head' if cross else 'head'}_fisher"][layer]
        n = groups[f"{stack}_ffn_fisher"][layer]
        kind = suffix.rsplit(".", 2)[-2]
        if "Attention.relative_attention_bias" in suffix:
            return cols(size, per(h, 1))
        if "Attention." in suffix:
            return rows(size, per(h, hd)) if kind in "qkv" else cols(size, per(h, hd))
        if kind in ("wi_0", "wi_1"):
            return rows(size, per(n, 1))
        return cols(size, per(n, 1)) if kind == "wo" else None
    match = LAYER.fullmatch(name)
    if match is None:
        return None  # embeddings, final norms, task heads: plain average under "nodes"
    layer, suffix = int(match[1]), match[2]
    h = groups["head_fisher"][layer]
    kv = h.view(kv_heads, -1).sum(dim=1)  # a KV head: the sum of the query heads that read it
    n = groups["ffn_fisher"][layer] if "ffn_fisher" in groups else None
    names = NAMES.get(arch, LLAMA)
    module, _, parameter = suffix.rpartition(".")
    if arch in ("mixtral", "qwen3_moe", "qwen2_moe") and suffix in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        e = groups["expert_fisher"][layer]  # (E, I)
        out = torch.empty(size)
        for expert in range(size[0]):
            if suffix.endswith("gate_up_proj"):  # [E, 2I, H]: rows [gate | up] by neuron
                out[expert] = rows(size[1:], per(torch.cat([e[expert], e[expert]]), 1))
            else:  # [E, H, I]: columns by neuron
                out[expert] = cols(size[1:], per(e[expert], 1))
        return out
    if arch == "phi3" and suffix == "self_attn.qkv_proj.weight":
        return rows(size, per(h, hd) + per(kv, hd) + per(kv, hd))
    if arch == "phi3" and suffix == "mlp.gate_up_proj.weight":
        return rows(size, per(n, 1) * 2)
    if arch.startswith("gpt_neox") and module == "attention.query_key_value":  # per head [q_h | k_h | v_h]
        return rows(size, [float(v) for v in h for _ in range(3 * hd)])
    if arch == "modernbert" and module == "attn.Wqkv":
        return rows(size, per(h, hd) * 3)
    if arch == "modernbert" and module == "mlp.Wi":
        return rows(size, per(n, 1) * 2)
    if arch == "olmo2" and suffix in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        return rows(size, per(h if "q_norm" in suffix else kv, hd))
    if module == names.get("q"):
        return rows(size, per(h, hd))
    if module in (names.get("k"), names.get("v")):
        return rows(size, per(kv, hd))
    if module == names.get("o"):
        return cols(size, per(h, hd)) if parameter == "weight" else None
    if module in names.get("up", ()):
        return rows(size, per(n, 1))
    if module == names.get("down"):
        return cols(size, per(n, 1)) if parameter == "weight" else None
    return None  # norms, biases after a sum, routers


FORMULA_ARCHS = sorted(set(ARCHS) - {"gpt2", "roberta", "xlm-roberta"})  # those three: test_merge_kernel.py


@pytest.mark.parametrize("arch", FORMULA_ARCHS)
def test_every_tensor_matches_the_hand_written_layout(arch, tmp_path):
    models = [build_model(arch, seed=s) for s in range(3)]
    shape = NodeShape.from_config(models[0].config)
    lambdas = [1.0, 0.5, 2.0]
    paths = [str(tmp_path / f"f{i}.safetensors") for i in range(3)]
    fishers = [write_fisher(p, shape, seed=i) for i, p in enumerate(paths)]
    states = [floats(m) for m in models]
    merged = merge_state_dicts(states, FISHER_MASK, parameters={"weight": lambdas, "fisher": paths, "normalize": "none"})
    weighted = 0
    for name, out in merged.items():
        thetas = [s[name] for s in states]
        weights = [expected_weight(arch, name, tuple(out.shape), f.groups, shape) for f in fishers]
        if weights[0] is None:
            expected = sum(l * t for l, t in zip(lambdas, thetas)) / sum(lambdas)
        else:
            weighted += 1
            weights = [l * w for l, w in zip(lambdas, weights)]  # no floor by default
            expected = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert weighted >= 8


def projections(model, spec) -> list:
    """Every in-layer linear weight and expert matrix, found from the model's modules (not from the table); the
    routers are left out: they are uncovered by design."""
    names = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (torch.nn.Linear, transformers.pytorch_utils.Conv1D)):
            names.append(prefix + "weight")
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and isinstance(module.down_proj, torch.nn.Parameter):
            names += [prefix + "gate_up_proj", prefix + "down_proj"]
    in_layer = [n for n in names if spec.locate(n)[0] is not None]
    return [n for n in in_layer if not n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_dominant_fisher_takes_every_projection(arch, tmp_path):
    """A's Fisher all ones, B's all zeros: every attention and FFN projection of the merge is A's."""
    models = [build_model(arch, seed=s) for s in (1, 2)]
    shape = NodeShape.from_config(models[0].config)
    paths = [str(tmp_path / f"f{i}.safetensors") for i in range(2)]
    write_fisher(paths[0], shape, 0, fill=1.0)
    write_fisher(paths[1], shape, 1, fill=0.0)
    states = [floats(m) for m in models]
    merged = merge_state_dicts(states, FISHER_MASK, parameters={"fisher": paths})
    checked = projections(models[0], get_architecture(shape.model_type))
    assert len(checked) >= 4 * shape.num_layers, checked
    for name in checked:
        torch.testing.assert_close(merged[name], states[0][name], rtol=1e-7, atol=1e-9, msg=name)


def test_an_expert_no_token_reached_falls_back_to_the_average(tmp_path):
    models = [build_model("qwen3_moe", seed=s) for s in (1, 2)]
    shape = NodeShape.from_config(models[0].config)
    paths = [str(tmp_path / f"f{i}.safetensors") for i in range(2)]
    for i, path in enumerate(paths):
        fisher = write_fisher(path, shape, i)
        fisher.groups["expert_fisher"][0, 1] = 0.0  # expert 1 of layer 0: never routed to, in both models
        save_mask_fisher(fisher, path)
    states = [floats(m) for m in models]
    merged = merge_state_dicts(states, FISHER_MASK, parameters={"fisher": paths, "weight": [1.0, 3.0]})
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        expected = (states[0][name][1] + 3 * states[1][name][1]) / 4
        torch.testing.assert_close(merged[name][1], expected)
        assert not torch.allclose(merged[name][0], (states[0][name][0] + 3 * states[1][name][0]) / 4)


@pytest.mark.parametrize(
    "arch, overrides, match",
    [
        ("stablelm", {"qk_layernorm": True}, "drops the per-head q/k norms"),
        ("stablelm", {"use_parallel_residual": True}, "requires post_attention_layernorm"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, "dense and sparse layers mixed"),
        ("t5", {"feed_forward_proj": "relu"}, "only gated T5"),
    ],
)
def test_configurations_mergekit_cannot_merge_are_refused(arch, overrides, match, tmp_path):
    config_cls, _, kwargs = ARCHS[arch]
    config = config_cls(**{**kwargs, **{k: v for k, v in overrides.items() if k != "architectures"}})
    config.architectures = overrides.get("architectures", [ARCHS[arch][1].__name__])
    with pytest.raises(UnsupportedArchitectureError, match=match):
        NodeShape.from_config(config)


def test_token_classifiers_with_different_tag_sets_take_the_base_head(model_zoo, tmp_path):
    import yaml
    from click.testing import CliRunner
    from conftest import data_for

    from mergekit_fisher_mask.cli import main

    three, five = model_zoo("bert-tokens", seed=1), save_model(tmp_path / "five", "bert-tokens", seed=2, num_labels=5)
    data = data_for("bert-tokens", tmp_path)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fisher_mask", "base_model": str(five),
        "models": [{"model": str(m), "parameters": {"calibration_data": str(data)}} for m in (three, five)],
        "calibration": {"samples": 8, "batch_size": 4},
    }))
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "--fisher-cache",
                                       str(tmp_path / "cache")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out")
    base = transformers.AutoModelForTokenClassification.from_pretrained(five)
    assert merged.config.num_labels == 5
    torch.testing.assert_close(merged.classifier.weight, base.classifier.weight)


@pytest.mark.parametrize("arch", ["mixtral", "t5", "bert-tokens", "bert-qa"])
def test_full_fisher_is_refused_where_it_does_not_apply(arch, model_zoo, tmp_path):
    from conftest import data_for

    from mergekit_fisher_mask import CalibrationSettings, FisherMaskError, calibrate_full

    with pytest.raises(FisherMaskError, match="supports sequence classifiers and causal LMs"):
        calibrate_full(str(model_zoo(arch)), str(data_for(arch, tmp_path)), tmp_path / "full",
                       CalibrationSettings(samples=4), progress=False)
    assert not (tmp_path / "full").exists()
