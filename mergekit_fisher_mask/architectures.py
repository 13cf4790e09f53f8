"""Per-architecture knowledge, as data: where the mask nodes sit and which tensor axis each node indexes.

Every supported family is one :class:`ArchitectureSpec` in :data:`ARCHITECTURES`, keyed by
``config.model_type``. Nothing else in the package branches on module or tensor names.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from .errors import UnsupportedArchitectureError


class Positions(str, enum.Enum):
    """How a family encodes positions, which decides what happens past ``max_position_embeddings``."""

    ABSOLUTE = "absolute"  # a learned table: longer inputs crash, so max_length is capped
    AFTER_PAD = "after_pad"  # RoBERTa: the table starts at pad_token_id + 1, so pad_token_id + 1 fewer tokens fit
    ROTARY = "rotary"  # RoPE and friends: longer inputs run, but past the length the model was trained on


class Role(str, enum.Enum):
    """What a tensor is to the mask nodes; the merge scheme decides how each role is weighted."""

    Q = "q"  # rows indexed by query head
    K = "k"  # rows indexed by key/value head
    V = "v"  # rows indexed by key/value head
    QKV = "qkv"  # GPT-2 fused [q | k | v] along one axis
    O = "o"  # attention output projection, input axis indexed by query head
    O_BIAS = "o_bias"  # added after the head sum: no head scales it
    ATTN_NORM = "attn_norm"  # the LayerNorm/RMSNorm that belongs to the attention block
    UP = "up"  # FFN up/gate/intermediate, output axis indexed by neuron
    DOWN = "down"  # FFN down projection, input axis indexed by neuron
    DOWN_BIAS = "down_bias"
    FFN_NORM = "ffn_norm"  # the norm that belongs to the FFN block
    EMBEDDING = "embedding"  # embeddings and pooler (the paper's "mean over all layers")


@dataclass(frozen=True)
class TensorRule:
    """How one in-layer tensor relates to the nodes: its role and the axis the nodes index (None: no axis)."""

    role: Role
    axis: Optional[int] = None


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where a family's mask nodes are and how its tensors map onto them."""

    name: str
    layers: str  # module path of the decoder/encoder layer list, relative to ``model.base_model``
    head_module: str  # module (relative to a layer) whose *input* is the per-head attention output
    neuron_module: str  # module (relative to a layer) whose *input* is the FFN activation
    layer_tensor_pattern: str  # regex over full tensor names; group 1 = layer index, group 2 = suffix
    tensors: Mapping[str, TensorRule]  # exact in-layer suffix -> rule
    embedding_pattern: str  # regex: tensors that get the model-wide mean under scheme "paper"
    task_head_pattern: str  # regex: task-specific head tensors (classifier / score)
    positions: Positions = Positions.ROTARY

    def layer_and_rule(self, tensor_name: str) -> Tuple[Optional[int], Optional[TensorRule]]:
        """Return (layer index, rule) for a tensor name; (None, None) outside layers, rule None if uncovered."""
        match = re.fullmatch(self.layer_tensor_pattern, tensor_name)
        if match is None:
            if re.fullmatch(self.embedding_pattern, tensor_name):
                return None, TensorRule(Role.EMBEDDING)
            return None, None
        return int(match.group(1)), self.tensors.get(match.group(2))

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


def _linear_pair(suffix: str, role: Role, axis: int) -> dict:
    """nn.Linear weight [out, in] and bias [out]: a bias follows the weight only on the output axis."""
    rules = {f"{suffix}.weight": TensorRule(role, axis)}
    if axis == 0:
        rules[f"{suffix}.bias"] = TensorRule(role, 0)
    return rules


_BERT_TENSORS = {
    **_linear_pair("attention.self.query", Role.Q, 0),
    **_linear_pair("attention.self.key", Role.K, 0),
    **_linear_pair("attention.self.value", Role.V, 0),
    **_linear_pair("attention.output.dense", Role.O, 1),
    "attention.output.dense.bias": TensorRule(Role.O_BIAS),
    "attention.output.LayerNorm.weight": TensorRule(Role.ATTN_NORM),
    "attention.output.LayerNorm.bias": TensorRule(Role.ATTN_NORM),
    **_linear_pair("intermediate.dense", Role.UP, 0),
    **_linear_pair("output.dense", Role.DOWN, 1),
    "output.dense.bias": TensorRule(Role.DOWN_BIAS),
    "output.LayerNorm.weight": TensorRule(Role.FFN_NORM),
    "output.LayerNorm.bias": TensorRule(Role.FFN_NORM),
}

# Llama-style decoders: pre-norm, optional q/k/v biases (Qwen2), per-head q/k norms (Qwen3) left uncovered
# because one norm vector is shared by all heads.
_LLAMA_TENSORS = {
    **_linear_pair("self_attn.q_proj", Role.Q, 0),
    **_linear_pair("self_attn.k_proj", Role.K, 0),
    **_linear_pair("self_attn.v_proj", Role.V, 0),
    **_linear_pair("self_attn.o_proj", Role.O, 1),
    "self_attn.o_proj.bias": TensorRule(Role.O_BIAS),
    "input_layernorm.weight": TensorRule(Role.ATTN_NORM),
    "post_attention_layernorm.weight": TensorRule(Role.FFN_NORM),
    **_linear_pair("mlp.gate_proj", Role.UP, 0),
    **_linear_pair("mlp.up_proj", Role.UP, 0),
    **_linear_pair("mlp.down_proj", Role.DOWN, 1),
    "mlp.down_proj.bias": TensorRule(Role.DOWN_BIAS),
}

# GPT-2 uses Conv1D, whose weight is stored transposed: [in, out].
_GPT2_TENSORS = {
    "attn.c_attn.weight": TensorRule(Role.QKV, 1),
    "attn.c_attn.bias": TensorRule(Role.QKV, 0),
    "attn.c_proj.weight": TensorRule(Role.O, 0),
    "attn.c_proj.bias": TensorRule(Role.O_BIAS),
    "ln_1.weight": TensorRule(Role.ATTN_NORM),
    "ln_1.bias": TensorRule(Role.ATTN_NORM),
    "mlp.c_fc.weight": TensorRule(Role.UP, 1),
    "mlp.c_fc.bias": TensorRule(Role.UP, 0),
    "mlp.c_proj.weight": TensorRule(Role.DOWN, 0),
    "mlp.c_proj.bias": TensorRule(Role.DOWN_BIAS),
    "ln_2.weight": TensorRule(Role.FFN_NORM),
    "ln_2.bias": TensorRule(Role.FFN_NORM),
}

# One optional leading component ("bert.", "model.", ...) so a tensor is found whether the checkpoint holds a
# bare body or a model with a head; the layer index is matched as a whole dot-delimited number.
_PREFIX = r"(?:[A-Za-z_][A-Za-z0-9_]*\.)?"


def _bert_like(name: str, positions: Positions = Positions.ABSOLUTE) -> ArchitectureSpec:
    return ArchitectureSpec(
        name=name,
        layers="encoder.layer",
        head_module="attention.output.dense",
        neuron_module="output.dense",
        layer_tensor_pattern=_PREFIX + r"encoder\.layer\.(\d+)\.(.+)",
        tensors=_BERT_TENSORS,
        embedding_pattern=_PREFIX + r"(?:embeddings\.(?!position_ids).+|pooler\..+)",
        task_head_pattern=r"classifier\..+",
        positions=positions,
    )


def _llama_like(name: str) -> ArchitectureSpec:
    return ArchitectureSpec(
        name=name,
        layers="layers",
        head_module="self_attn.o_proj",
        neuron_module="mlp.down_proj",
        layer_tensor_pattern=_PREFIX + r"layers\.(\d+)\.(.+)",
        tensors=_LLAMA_TENSORS,
        embedding_pattern=_PREFIX + r"embed_tokens\.weight",
        task_head_pattern=r"score\..+",
    )


ARCHITECTURES: Mapping[str, ArchitectureSpec] = {
    "bert": _bert_like("BERT"),
    "roberta": _bert_like("RoBERTa", Positions.AFTER_PAD),
    "xlm-roberta": _bert_like("XLM-RoBERTa", Positions.AFTER_PAD),
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3"),
    "gpt2": ArchitectureSpec(
        name="GPT-2",
        layers="h",
        head_module="attn.c_proj",
        neuron_module="mlp.c_proj",
        layer_tensor_pattern=_PREFIX + r"h\.(\d+)\.(.+)",
        tensors=_GPT2_TENSORS,
        embedding_pattern=_PREFIX + r"(?:wte|wpe)\.weight",
        task_head_pattern=r"score\..+",
        positions=Positions.ABSOLUTE,
    ),
}


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
    intermediate_size: int
    hidden_size: int

    @classmethod
    def from_config(cls, config, *, where: str = "model") -> "NodeShape":
        get_architecture(config.model_type, where=where)
        hidden = config.hidden_size
        heads = config.num_attention_heads
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            # GPT-2 leaves n_inner unset to mean 4 * hidden.
            intermediate_size=intermediate or 4 * hidden,
            hidden_size=hidden,
        )
