"""Per-architecture knowledge, as data: where the mask nodes sit and which tensor axis each node indexes.

Every supported family is one :class:`ArchitectureSpec` in :data:`ARCHITECTURES`, keyed by ``config.model_type``.
The module and tensor names the package uses (where masks go, which axis a node indexes, the experts' fused
weights and activation) all come from this table; nothing else branches on names.

A model has one or two *stacks* of layers (a decoder; an encoder; T5's encoder and decoder). Each stack has *node
groups*, each measured at one module of every layer:

* ``head``: one mask per attention head, scaling the head's slice of the output projection's input;
* ``cross_head``: the same for an encoder-decoder model's cross-attention;
* ``ffn``: one mask per FFN neuron, scaling a channel of the down projection's input;
* ``expert``: one mask per routed expert's neuron (mixture of experts), scaling its activation.

A group's Fisher is stored in the mask-Fisher file as ``<stack>_<group>_fisher`` (``head_fisher`` and
``ffn_fisher`` for single-stack models). Each in-layer tensor has a :class:`TensorRule`: its role (which decides how
a scheme weights it), the group it belongs to, and the axis its nodes index.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from .errors import UnsupportedArchitectureError


class Positions(str, enum.Enum):
    """How a family encodes positions, which decides what happens past ``max_position_embeddings``."""

    ABSOLUTE = "absolute"  # a learned table: longer inputs crash, so max_length is capped
    AFTER_PAD = "after_pad"  # RoBERTa: the table starts at pad_token_id + 1, so pad_token_id + 1 fewer tokens fit
    ROTARY = "rotary"  # RoPE, relative buckets and friends: longer inputs run, past the length trained on


class Kind(str, enum.Enum):
    """What a node group's masks scale."""

    HEADS = "heads"  # per attention head: head_dim channels of the output projection's input
    NEURONS = "neurons"  # per FFN neuron: one channel of the down projection's input
    EXPERTS = "experts"  # per routed expert and neuron: one channel of that expert's activation


class Role(str, enum.Enum):
    """What a tensor is to the mask nodes; the merge scheme decides how each role is weighted."""

    Q = "q"  # indexed by query head (head_dim entries each) along the axis
    K = "k"  # indexed by key/value head
    V = "v"  # indexed by key/value head
    QKV = "qkv"  # fused [q heads | k kv-heads | v kv-heads] along the axis (GPT-2, Phi-3, ModernBERT)
    QKV_PER_HEAD = "qkv_per_head"  # fused per head [q_h | k_h | v_h] along the axis (GPT-NeoX)
    HEADWISE = "headwise"  # one entry per query head along the axis (T5's relative attention bias)
    O = "o"  # attention output projection, input axis indexed by query head
    O_BIAS = "o_bias"  # added after the head sum: no head scales it
    ATTN_NORM = "attn_norm"  # a norm that belongs to the attention block
    UP = "up"  # FFN up/gate/intermediate, indexed by neuron along the axis
    UP_PAIR = "up_pair"  # fused [first I | second I] along the axis, both halves by neuron (Phi-3, ModernBERT)
    DOWN = "down"  # FFN down projection, input axis indexed by neuron
    DOWN_BIAS = "down_bias"
    FFN_NORM = "ffn_norm"  # a norm that belongs to the FFN block
    EXPERT_UP_PAIR = "expert_up_pair"  # [E, 2I, H]: expert on axis 0, [gate | up] neurons on the axis
    EXPERT_DOWN = "expert_down"  # [E, H, I]: expert on axis 0, neurons on the axis
    ROUTER = "router"  # a mixture's router: indexed by expert, covered by no mask (plain average)
    EMBEDDING = "embedding"  # embeddings and pooler (the paper's "mean over all layers")

    @property
    def kind(self) -> Optional[Kind]:
        """The kind of node group that indexes this role (None: no node scales it)."""
        if self in _HEAD_ROLES:
            return Kind.HEADS
        if self in (Role.UP, Role.UP_PAIR, Role.DOWN):
            return Kind.NEURONS
        if self in (Role.EXPERT_UP_PAIR, Role.EXPERT_DOWN):
            return Kind.EXPERTS
        return None


_HEAD_ROLES = (Role.Q, Role.K, Role.V, Role.QKV, Role.QKV_PER_HEAD, Role.HEADWISE, Role.O)


@dataclass(frozen=True)
class TensorRule:
    """How one in-layer tensor relates to the nodes: its role, the axis the nodes index, and its node group
    (default: ``head`` for attention roles and norms, ``ffn`` for FFN roles, ``expert`` for experts)."""

    role: Role
    axis: Optional[int] = None
    group: Optional[str] = None

    @property
    def group_name(self) -> str:
        if self.group:
            return self.group
        if self.role.kind == Kind.EXPERTS:
            return "expert"
        return "ffn" if self.role in (Role.UP, Role.UP_PAIR, Role.DOWN, Role.DOWN_BIAS, Role.FFN_NORM) else "head"


@dataclass(frozen=True)
class NodeSite:
    """Where a node group is measured, relative to one layer.

    The masks scale the input of ``module`` (heads, neurons) or, for experts, the activation inside ``module``'s
    experts (``act(gate) * up``, computed from its ``gate_up`` parameter and ``activation``). ``weight`` names the parameter whose ``input_axis`` the nodes index, which the independent check
    ``dL/dm_c = sum_r W[r, c] dL/dW[r, c]`` uses.
    """

    kind: Kind
    module: str
    weight: str = "weight"
    input_axis: int = 1
    gate_up: Optional[str] = None  # experts: the fused [E, 2I, H] gate/up parameter of ``module``
    activation: Optional[str] = None  # experts: the activation attribute of ``module``


@dataclass(frozen=True)
class GramInput:
    """A linear layer's input whose Gram matrix RegMean measures, and the weights that read it.

    ``module`` is the module (relative to one layer) whose input is measured; ``weights`` are the in-layer names of
    every weight that multiplies that same input (q, k and v share one; so do gate and up); ``input_axis`` is the
    weights' input axis (1 for ``nn.Linear``'s [out, in], 0 for GPT-2's transposed Conv1D [in, out]).
    """

    module: str
    weights: Tuple[str, ...]
    input_axis: int = 1


@dataclass(frozen=True)
class Stack:
    """One stack of layers and its node groups."""

    name: str  # "" for single-stack models; else "encoder" / "decoder", prefixed to the file keys
    layers: str  # module path of the layer list, relative to ``model.base_model``
    pattern: str  # regex over full tensor names; group 1 = layer index, group 2 = in-layer suffix
    sites: Mapping[str, NodeSite]  # group name -> where it is measured
    tensors: Mapping[str, TensorRule]  # exact in-layer suffix -> rule
    decoder: bool = False  # layer count from the config's decoder key (T5's num_decoder_layers)
    # RegMean's inputs, by name (attn_in, attn_out, ffn_in, ffn_out); empty: the family has no Gram pass
    grams: Mapping[str, GramInput] = field(default_factory=dict)

    def key(self, group: str) -> str:
        """The group's tensor name in the mask-Fisher file."""
        return f"{self.name}_{group}_fisher" if self.name else f"{group}_fisher"


@dataclass(frozen=True)
class ConfigKeys:
    """Which config attributes give the node layout (None: the family has no such thing)."""

    ffn: Optional[str] = "intermediate_size"  # neurons of the ``ffn`` group
    ffn_multiple: Optional[int] = None  # the ``ffn`` key unset means this many times hidden_size (GPT-2's n_inner)
    experts: Optional[str] = None  # routed experts per layer
    expert_ffn: Optional[str] = None  # neurons per expert
    decoder_layers: Optional[str] = None  # layers of a decoder stack


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where a family's mask nodes are and how its tensors map onto them."""

    name: str
    stacks: Tuple[Stack, ...]
    embedding_pattern: str  # regex: tensors that get the model-wide mean under scheme "paper"
    task_head_pattern: str  # regex: task-specific head tensors (classifier / score / qa_outputs)
    positions: Positions = Positions.ROTARY
    keys: ConfigKeys = field(default_factory=ConfigKeys)
    checks: Tuple[Tuple[str, object, str], ...] = ()  # (config attribute, refused value, why), see check_config
    # How the LM head's logits are transformed before the loss: ("softcap", attribute) for c * tanh(z / c),
    # ("divide", attribute) for z / s, where the config attribute holds c or s (None there: no transform).
    logits: Optional[Tuple[str, str]] = None
    causal: bool = True  # attention of the layers is causal (decoders); False for bidirectional encoders

    def locate(self, tensor_name: str) -> Tuple[Optional[Stack], Optional[int], Optional[TensorRule]]:
        """(stack, layer index, rule) for a tensor name; (None, None, EMBEDDING rule or None) outside layers; rule
        None for an uncovered in-layer tensor."""
        for stack in self.stacks:
            match = re.fullmatch(stack.pattern, tensor_name)
            if match is not None:
                return stack, int(match.group(1)), stack.tensors.get(match.group(2))
        if re.fullmatch(self.embedding_pattern, tensor_name):
            return None, None, TensorRule(Role.EMBEDDING)
        return None, None, None

    def is_task_head(self, tensor_name: str) -> bool:
        return re.fullmatch(self.task_head_pattern, tensor_name) is not None

    def position_limit(self, config) -> Tuple[Optional[int], bool]:
        """(most tokens the model takes, whether more would crash); (None, False) if the config names no limit."""
        limit = getattr(config, "max_position_embeddings", None)
        if not limit:
            return None, False
        if self.positions == Positions.AFTER_PAD:
            return limit - (config.pad_token_id or 0) - 1, True
        return limit, self.positions != Positions.ROTARY

    def check_config(self, config, where: str) -> None:
        """Refuse configurations of a supported family that the merge cannot handle (clear error, before work)."""
        for attribute, refused, why in self.checks:
            value = getattr(config, attribute, None)
            if (refused(value) if callable(refused) else value == refused):
                raise UnsupportedArchitectureError(f"{where}: {self.name} with {attribute}={value!r} is not supported: {why}")


def _linear(suffix: str, role: Role, axis: int, group: Optional[str] = None, bias: bool = True) -> dict:
    """nn.Linear weight [out, in] and bias [out]: a bias follows the weight only on the output axis."""
    rules = {f"{suffix}.weight": TensorRule(role, axis, group)}
    if bias:
        rules[f"{suffix}.bias"] = TensorRule(role, 0, group) if axis == 0 else TensorRule(
            Role.O_BIAS if role == Role.O else Role.DOWN_BIAS, None, group
        )
    return rules


def _norms(attention: Tuple[str, ...], ffn: Tuple[str, ...], group: Optional[str] = None) -> dict:
    rules = {f"{n}.{p}": TensorRule(Role.ATTN_NORM, None, group) for n in attention for p in ("weight", "bias")}
    rules.update({f"{n}.{p}": TensorRule(Role.FFN_NORM) for n in ffn for p in ("weight", "bias")})
    return rules


def _attention(q: str, k: str, v: str, o: str, group: Optional[str] = None) -> dict:
    return {**_linear(q, Role.Q, 0, group), **_linear(k, Role.K, 0, group), **_linear(v, Role.V, 0, group),
            **_linear(o, Role.O, 1, group)}


def _gated_ffn(gate: str, up: str, down: str) -> dict:
    return {**_linear(gate, Role.UP, 0), **_linear(up, Role.UP, 0), **_linear(down, Role.DOWN, 1)}


GRAM_INPUTS = ("attn_in", "attn_out", "ffn_in", "ffn_out")  # the names of RegMean's inputs of a layer


def _grams(attention: Tuple[str, ...], out: str, ffn_in: Tuple[str, ...] = (), ffn_out: Optional[str] = None,
           axis: int = 1) -> Dict[str, GramInput]:
    """RegMean's inputs of a layer (:data:`GRAM_INPUTS`): the attention projections' shared input, the attention
    output projection's, the FFN input projections' shared input and the FFN output projection's."""
    weights = lambda modules: tuple(f"{module}.weight" for module in modules)  # noqa: E731
    found = {"attn_in": attention, "attn_out": (out,), "ffn_in": ffn_in, "ffn_out": (ffn_out,) if ffn_out else ()}
    return {site: GramInput(modules[0], weights(modules), axis) for site, modules in found.items() if modules}


_LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_GRAMS = _grams(_LLAMA_QKV, "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
_BERT_GRAMS = _grams(("attention.self.query", "attention.self.key", "attention.self.value"), "attention.output.dense",
                     ("intermediate.dense",), "output.dense")

# One optional leading component ("bert.", "model.", ...) so a tensor is found whether the checkpoint holds a
# bare body or a model with a head; the layer index is matched as a whole dot-delimited number.
_PREFIX = r"(?:[A-Za-z_][A-Za-z0-9_]*\.)?"
_LLAMA_SITES = {"head": NodeSite(Kind.HEADS, "self_attn.o_proj"), "ffn": NodeSite(Kind.NEURONS, "mlp.down_proj")}
_DECODER_HEADS = r"(?:score|classifier|qa_outputs)\..+"

_BERT_TENSORS = {
    **_attention("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    **_norms(("attention.output.LayerNorm",), ("output.LayerNorm",)),
    **_linear("intermediate.dense", Role.UP, 0),
    **_linear("output.dense", Role.DOWN, 1),
}

# Llama-style decoders: pre-norm, optional q/k/v biases (Qwen2, Granite), per-head q/k norms shared by all heads
# (Qwen3, Gemma 3) left uncovered. `post_attention_layernorm` is the FFN's input norm here.
_LLAMA_TENSORS = {
    **_attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    **_norms(("input_layernorm",), ("post_attention_layernorm",)),
    **_gated_ffn("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
# Gemma 2/3 norm the attention output (`post_attention_layernorm`) and the FFN's input and output.
_GEMMA2_TENSORS = {
    **_attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    **_norms(("input_layernorm", "post_attention_layernorm"), ("pre_feedforward_layernorm", "post_feedforward_layernorm")),
    **_gated_ffn("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
# OLMo 2: post-norms only; q_norm / k_norm span the whole projection, so their entries belong to heads.
_OLMO2_TENSORS = {
    **_attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "self_attn.q_norm.weight": TensorRule(Role.Q, 0),
    "self_attn.k_norm.weight": TensorRule(Role.K, 0),
    **_norms(("post_attention_layernorm",), ("post_feedforward_layernorm",)),
    **_gated_ffn("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
_STARCODER2_TENSORS = {
    **_attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    **_norms(("input_layernorm",), ("post_attention_layernorm",)),
    **_linear("mlp.c_fc", Role.UP, 0),
    **_linear("mlp.c_proj", Role.DOWN, 1),
}
_PHI3_TENSORS = {
    "self_attn.qkv_proj.weight": TensorRule(Role.QKV, 0),
    **_linear("self_attn.o_proj", Role.O, 1),
    **_norms(("input_layernorm",), ("post_attention_layernorm",)),
    "mlp.gate_up_proj.weight": TensorRule(Role.UP_PAIR, 0),
    **_linear("mlp.down_proj", Role.DOWN, 1),
}
# GPT-2 uses Conv1D, whose weight is stored transposed: [in, out].
_GPT2_TENSORS = {
    "attn.c_attn.weight": TensorRule(Role.QKV, 1),
    "attn.c_attn.bias": TensorRule(Role.QKV, 0),
    "attn.c_proj.weight": TensorRule(Role.O, 0),
    "attn.c_proj.bias": TensorRule(Role.O_BIAS),
    **_norms(("ln_1",), ("ln_2",)),
    "mlp.c_fc.weight": TensorRule(Role.UP, 1),
    "mlp.c_fc.bias": TensorRule(Role.UP, 0),
    "mlp.c_proj.weight": TensorRule(Role.DOWN, 0),
    "mlp.c_proj.bias": TensorRule(Role.DOWN_BIAS),
}
_GPT_NEOX_TENSORS = {
    **{f"attention.query_key_value.{p}": TensorRule(Role.QKV_PER_HEAD, 0) for p in ("weight", "bias")},
    **_linear("attention.dense", Role.O, 1),
    **_norms(("input_layernorm",), ("post_attention_layernorm",)),
    **_linear("mlp.dense_h_to_4h", Role.UP, 0),
    **_linear("mlp.dense_4h_to_h", Role.DOWN, 1),
}
_MODERNBERT_TENSORS = {
    **{f"attn.Wqkv.{p}": TensorRule(Role.QKV, 0) for p in ("weight", "bias")},
    **_linear("attn.Wo", Role.O, 1),
    **_norms(("attn_norm",), ("mlp_norm",)),
    **{f"mlp.Wi.{p}": TensorRule(Role.UP_PAIR, 0) for p in ("weight", "bias")},
    **_linear("mlp.Wo", Role.DOWN, 1),
}
# Phi-2 runs attention and MLP in parallel from one input norm, which is left uncovered (it serves both).
_PHI_TENSORS = {
    **_attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
    **_linear("mlp.fc1", Role.UP, 0),
    **_linear("mlp.fc2", Role.DOWN, 1),
}
_DISTILBERT_TENSORS = {
    **_attention("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),
    **_norms(("sa_layer_norm",), ("output_layer_norm",)),
    **_linear("ffn.lin1", Role.UP, 0),
    **_linear("ffn.lin2", Role.DOWN, 1),
}
_DEBERTA_TENSORS = {
    **_attention("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                 "attention.output.dense"),
    **_linear("attention.self.pos_query_proj", Role.Q, 0),
    **_linear("attention.self.pos_key_proj", Role.K, 0),
    **_norms(("attention.output.LayerNorm",), ("output.LayerNorm",)),
    **_linear("intermediate.dense", Role.UP, 0),
    **_linear("output.dense", Role.DOWN, 1),
}
# Mixtures of experts (transformers 5 stores experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]).
_MOE_TENSORS = {
    **_attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    **_norms(("input_layernorm",), ("post_attention_layernorm",)),
    "mlp.experts.gate_up_proj": TensorRule(Role.EXPERT_UP_PAIR, 1),
    "mlp.experts.down_proj": TensorRule(Role.EXPERT_DOWN, 2),
    "mlp.gate.weight": TensorRule(Role.ROUTER),
}
_QWEN2_MOE_TENSORS = {
    **_MOE_TENSORS,
    **_gated_ffn("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
    "mlp.shared_expert_gate.weight": TensorRule(Role.ROUTER),
}
_MOE_SITES = {"head": NodeSite(Kind.HEADS, "self_attn.o_proj"),
              "expert": NodeSite(Kind.EXPERTS, "mlp.experts", weight="down_proj", input_axis=2, gate_up="gate_up_proj",
                                 activation="act_fn")}


def _t5_tensors(decoder: bool) -> dict:
    """T5 blocks: self-attention in layer.0, cross-attention in layer.1 (decoder), the FFN last."""
    ffn = "layer.2" if decoder else "layer.1"
    rules = {
        **_attention(*(f"layer.0.SelfAttention.{p}" for p in "qkvo")),
        "layer.0.SelfAttention.relative_attention_bias.weight": TensorRule(Role.HEADWISE, 1),
        **_norms(("layer.0.layer_norm",), (f"{ffn}.layer_norm",)),
        **_gated_ffn(f"{ffn}.DenseReluDense.wi_0", f"{ffn}.DenseReluDense.wi_1", f"{ffn}.DenseReluDense.wo"),
    }
    if decoder:
        rules.update(_attention(*(f"layer.1.EncDecAttention.{p}" for p in "qkvo"), group="cross_head"))
        rules.update(_norms(("layer.1.layer_norm",), (), group="cross_head"))
    return rules


def _t5_stack(name: str) -> Stack:
    decoder = name == "decoder"
    ffn = "layer.2" if decoder else "layer.1"
    sites = {"head": NodeSite(Kind.HEADS, "layer.0.SelfAttention.o"),
             "ffn": NodeSite(Kind.NEURONS, f"{ffn}.DenseReluDense.wo")}
    if decoder:
        sites = {"head": sites["head"], "cross_head": NodeSite(Kind.HEADS, "layer.1.EncDecAttention.o"),
                 "ffn": sites["ffn"]}
    return Stack(name, f"{name}.block", _PREFIX + rf"{name}\.block\.(\d+)\.(.+)", sites, _t5_tensors(decoder), decoder)


def _bert_like(name: str, positions: Positions = Positions.ABSOLUTE, tensors=_BERT_TENSORS,
               grams=_BERT_GRAMS) -> ArchitectureSpec:
    sites = {"head": NodeSite(Kind.HEADS, "attention.output.dense"), "ffn": NodeSite(Kind.NEURONS, "output.dense")}
    return ArchitectureSpec(
        name=name,
        stacks=(Stack("", "encoder.layer", _PREFIX + r"encoder\.layer\.(\d+)\.(.+)", sites, tensors, grams=grams),),
        embedding_pattern=_PREFIX + r"(?:embeddings\.(?!position_ids).+|pooler\..+|encoder\.rel_embeddings\..+"
        r"|encoder\.LayerNorm\..+)",
        task_head_pattern=r"(?:classifier|qa_outputs)\..+",
        positions=positions,
        causal=False,
    )


def _llama_like(name: str, tensors=_LLAMA_TENSORS, sites=_LLAMA_SITES, grams=_LLAMA_GRAMS, **options) -> ArchitectureSpec:
    return ArchitectureSpec(
        name=name,
        stacks=(Stack("", "layers", _PREFIX + r"layers\.(\d+)\.(.+)", sites, tensors, grams=grams),),
        embedding_pattern=_PREFIX + r"embed_tokens\.weight",
        task_head_pattern=_DECODER_HEADS,
        **options,
    )


# Mixtures of experts: attention only; routed experts and routers have no Gram (RegMean merges them by its
# ``nonlinear`` rule, and says so).
_MOE_GRAMS = _grams(_LLAMA_QKV, "self_attn.o_proj")


def _moe(name: str, tensors, keys: ConfigKeys, sites=_MOE_SITES, grams=_MOE_GRAMS) -> ArchitectureSpec:
    mixed = (
        "mlp_only_layers",
        lambda layers: bool(layers),
        "dense and sparse layers mixed; mergekit 0.1.5 silently drops such models' experts. Merge all-sparse models.",
    )
    step = ("decoder_sparse_step", lambda step: step not in (None, 1), mixed[2])
    return _llama_like(name, tensors, sites, grams, keys=keys, checks=(mixed, step))


# DeBERTa's query and key projections also project the relative position embeddings (share_att_key), so the
# token input they share with the value projection is measured at the value projection, which sees tokens only.
_DEBERTA = _bert_like("DeBERTa-v2", Positions.ROTARY, _DEBERTA_TENSORS, _grams(
    ("attention.self.value_proj", "attention.self.query_proj", "attention.self.key_proj"), "attention.output.dense",
    ("intermediate.dense",), "output.dense"))
_NO_QA = (  # mergekit 0.1.5 plans decoder QA models from the causal-LM tensor names and drops qa_outputs
    "architectures",
    lambda names: bool(names) and names[0].endswith("ForQuestionAnswering"),
    "mergekit 0.1.5 plans this family's question-answering checkpoints without their qa_outputs head.",
)

ARCHITECTURES: Mapping[str, ArchitectureSpec] = {
    "bert": _bert_like("BERT"),
    "roberta": _bert_like("RoBERTa", Positions.AFTER_PAD),
    "xlm-roberta": _bert_like("XLM-RoBERTa", Positions.AFTER_PAD),
    "distilbert": ArchitectureSpec(
        name="DistilBERT",
        stacks=(Stack("", "transformer.layer", _PREFIX + r"transformer\.layer\.(\d+)\.(.+)",
                      {"head": NodeSite(Kind.HEADS, "attention.out_lin"), "ffn": NodeSite(Kind.NEURONS, "ffn.lin2")},
                      _DISTILBERT_TENSORS,
                      grams=_grams(("attention.q_lin", "attention.k_lin", "attention.v_lin"), "attention.out_lin",
                                   ("ffn.lin1",), "ffn.lin2")),),
        embedding_pattern=_PREFIX + r"embeddings\.(?!position_ids).+",
        task_head_pattern=r"(?:pre_classifier|classifier|qa_outputs)\..+",
        positions=Positions.ABSOLUTE,
        keys=ConfigKeys(ffn="hidden_dim"),
        causal=False,
    ),
    "deberta-v2": ArchitectureSpec(
        name=_DEBERTA.name,
        stacks=_DEBERTA.stacks,
        embedding_pattern=_PREFIX + r"(?:embeddings\.(?!position_ids).+|encoder\.rel_embeddings\..+"
        r"|encoder\.LayerNorm\..+|encoder\.conv\..+)",
        task_head_pattern=r"(?:pooler|classifier|qa_outputs)\..+",  # DeBERTa's pooler is part of its task head
        positions=Positions.ROTARY,  # relative positions: no table to overflow
        causal=False,
    ),
    "modernbert": ArchitectureSpec(
        name="ModernBERT",
        stacks=(Stack("", "layers", _PREFIX + r"layers\.(\d+)\.(.+)",
                      {"head": NodeSite(Kind.HEADS, "attn.Wo"), "ffn": NodeSite(Kind.NEURONS, "mlp.Wo")},
                      _MODERNBERT_TENSORS, grams=_grams(("attn.Wqkv",), "attn.Wo", ("mlp.Wi",), "mlp.Wo")),),
        embedding_pattern=_PREFIX + r"embeddings\..+",
        task_head_pattern=r"(?:head|classifier|qa_outputs)\..+",
        causal=False,
    ),
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3"),
    "granite": _llama_like("Granite", logits=("divide", "logits_scaling")),
    "gemma": _llama_like("Gemma"),
    "gemma2": _llama_like("Gemma 2", _GEMMA2_TENSORS, logits=("softcap", "final_logit_softcapping")),
    "gemma3_text": _llama_like("Gemma 3", _GEMMA2_TENSORS, logits=("softcap", "final_logit_softcapping")),
    "olmo2": _llama_like("OLMo 2", _OLMO2_TENSORS),
    "stablelm": _llama_like(
        "StableLM",
        checks=(
            ("qk_layernorm", True, "mergekit 0.1.5's StableLM definition drops the per-head q/k norms."),
            ("use_parallel_residual", True, "mergekit 0.1.5's StableLM definition requires post_attention_layernorm, "
             "which parallel-residual models lack."),
        ),
    ),
    "starcoder2": _llama_like(
        "StarCoder2", _STARCODER2_TENSORS, {"head": _LLAMA_SITES["head"], "ffn": NodeSite(Kind.NEURONS, "mlp.c_proj")},
        _grams(_LLAMA_QKV, "self_attn.o_proj", ("mlp.c_fc",), "mlp.c_proj"),
    ),
    "phi3": _llama_like("Phi-3", _PHI3_TENSORS, grams=_grams(("self_attn.qkv_proj",), "self_attn.o_proj",
                                                               ("mlp.gate_up_proj",), "mlp.down_proj")),
    "phi": _llama_like(
        "Phi", _PHI_TENSORS, {"head": NodeSite(Kind.HEADS, "self_attn.dense"), "ffn": NodeSite(Kind.NEURONS, "mlp.fc2")},
        _grams(_LLAMA_QKV + ("mlp.fc1",), "self_attn.dense", (), "mlp.fc2"),  # parallel block: fc1 reads the same input
        checks=(("qk_layernorm", True, "per-head q/k norms are not supported for Phi yet."),),
    ),
    "gpt_neox": ArchitectureSpec(
        name="GPT-NeoX",
        stacks=(Stack("", "layers", _PREFIX + r"layers\.(\d+)\.(.+)",
                      {"head": NodeSite(Kind.HEADS, "attention.dense"),
                       "ffn": NodeSite(Kind.NEURONS, "mlp.dense_4h_to_h")}, _GPT_NEOX_TENSORS,
                      grams=_grams(("attention.query_key_value",), "attention.dense", ("mlp.dense_h_to_4h",),
                                   "mlp.dense_4h_to_h")),),
        embedding_pattern=_PREFIX + r"embed_in\.weight",
        task_head_pattern=_DECODER_HEADS,
        checks=(_NO_QA,),  # causal LMs merge through the plugin's corrected mergekit definition
    ),
    "gpt2": ArchitectureSpec(
        name="GPT-2",
        stacks=(Stack("", "h", _PREFIX + r"h\.(\d+)\.(.+)",
                      {"head": NodeSite(Kind.HEADS, "attn.c_proj", input_axis=0),
                       "ffn": NodeSite(Kind.NEURONS, "mlp.c_proj", input_axis=0)}, _GPT2_TENSORS,
                      grams=_grams(("attn.c_attn",), "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj", axis=0)),),
        embedding_pattern=_PREFIX + r"(?:wte|wpe)\.weight",
        task_head_pattern=_DECODER_HEADS,
        positions=Positions.ABSOLUTE,
        keys=ConfigKeys(ffn="n_inner", ffn_multiple=4),
    ),
    "mixtral": _moe("Mixtral", _MOE_TENSORS, ConfigKeys(ffn=None, experts="num_local_experts",
                                                        expert_ffn="intermediate_size")),
    "qwen3_moe": _moe("Qwen3-MoE", _MOE_TENSORS, ConfigKeys(ffn=None, experts="num_experts",
                                                            expert_ffn="moe_intermediate_size")),
    "qwen2_moe": _moe(
        "Qwen2-MoE", _QWEN2_MOE_TENSORS,
        ConfigKeys(ffn="shared_expert_intermediate_size", experts="num_experts", expert_ffn="moe_intermediate_size"),
        {**_MOE_SITES, "ffn": NodeSite(Kind.NEURONS, "mlp.shared_expert.down_proj")},
        _grams(_LLAMA_QKV, "self_attn.o_proj", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
               "mlp.shared_expert.down_proj"),
    ),
    "t5": ArchitectureSpec(
        name="T5",
        stacks=(_t5_stack("encoder"), _t5_stack("decoder")),
        embedding_pattern=_PREFIX + r"(?:shared\.weight|(?:encoder|decoder)\.(?:embed_tokens\.weight|final_layer_norm\..+))",
        task_head_pattern=r"(?:classification_head|classifier|qa_outputs)\..+",
        keys=ConfigKeys(ffn="d_ff", decoder_layers="num_decoder_layers"),
        checks=(("is_gated_act", False, "only gated T5 (T5 v1.1, Flan-T5: feed_forward_proj 'gated-gelu') is supported; "
                 "mergekit 0.1.5's T5 definition requires wi_0/wi_1."),),
    ),
}
for _same in ("mt5", "umt5"):  # identical names; UMT5 has a relative attention bias in every block (covered)
    ARCHITECTURES[_same] = ArchitectureSpec(**{**ARCHITECTURES["t5"].__dict__, "name": _same.upper()})


def supported_model_types() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def get_architecture(model_type: str, *, where: str = "model") -> ArchitectureSpec:
    """Look up a family by ``model_type``; raise a clear error naming the model if it is unsupported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"{where}: model_type {model_type!r} is not supported by fisher_mask. "
            f"Supported model types: {supported_model_types()}."
        ) from None


@dataclass(frozen=True)
class NodeShape:
    """The mask-node layout of one model, read from its HF config."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # neurons of the ``ffn`` group (0: none)
    hidden_size: int
    num_experts: int = 0
    expert_size: int = 0  # neurons per routed expert
    num_decoder_layers: int = 0

    @classmethod
    def from_config(cls, config, *, where: str = "model") -> "NodeShape":
        spec = get_architecture(config.model_type, where=where)
        spec.check_config(config, where)
        keys = spec.keys
        hidden = config.hidden_size
        heads = config.num_attention_heads
        ffn = getattr(config, keys.ffn, None) if keys.ffn else 0
        if keys.ffn and not ffn:
            if not keys.ffn_multiple:
                raise UnsupportedArchitectureError(
                    f"{where}: its {spec.name} config has no {keys.ffn}, which gives the number of FFN neurons."
                )
            ffn = keys.ffn_multiple * hidden
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate_size=ffn,
            hidden_size=hidden,
            num_experts=getattr(config, keys.experts) if keys.experts else 0,
            expert_size=getattr(config, keys.expert_ffn) if keys.expert_ffn else 0,
            num_decoder_layers=getattr(config, keys.decoder_layers) if keys.decoder_layers else 0,
        )

    def group_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Each node group's file key and tensor shape: (L, H) heads, (L, D) neurons, (L, E, I) experts."""
        spec = get_architecture(self.model_type)
        shapes = {}
        for stack in spec.stacks:
            layers = self.num_decoder_layers if stack.decoder else self.num_layers
            for group, site in stack.sites.items():
                width = {Kind.HEADS: (self.num_heads,), Kind.NEURONS: (self.intermediate_size,),
                         Kind.EXPERTS: (self.num_experts, self.expert_size)}[site.kind]
                shapes[stack.key(group)] = (layers, *width)
        return shapes
