"""Tiny random models of every supported architecture, saved as normal HF folders with a word-level tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
VOCAB_SIZE = 48  # encoders: word-level vocabulary
DECODER_VOCAB_SIZE = 320  # decoders: byte-level BPE (259 tokens, as Qwen2's tokenizer class insists on) + room
SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
DECODER = dict(SIZE, vocab_size=DECODER_VOCAB_SIZE, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ENCODER = dict(SIZE, vocab_size=VOCAB_SIZE, max_position_embeddings=66, num_labels=3)

# name -> (config class, model class, config kwargs); each family's quirks are exercised: GQA (llama, mistral, qwen2,
# qwen3), q/k/v biases (qwen2), explicit head_dim != hidden/heads (qwen3), fused transposed Conv1D (gpt2).
ARCHS: Dict[str, Tuple[Callable, Callable, dict]] = {
    "bert": (transformers.BertConfig, transformers.BertForSequenceClassification, dict(ENCODER, pad_token_id=0)),
    "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification, dict(ENCODER, pad_token_id=0)),
    "xlm-roberta": (
        transformers.XLMRobertaConfig,
        transformers.XLMRobertaForSequenceClassification,
        dict(ENCODER, pad_token_id=0),
    ),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(DECODER, num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(DECODER, num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(DECODER, num_key_value_heads=2)),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(DECODER, num_key_value_heads=2, head_dim=16),
    ),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(vocab_size=DECODER_VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    ),
}
CLASSIFIERS = ("bert", "roberta", "xlm-roberta")


def make_tokenizer(encoder: bool) -> PreTrainedTokenizerFast:
    if not encoder:
        # Like SmolLM2: no dedicated pad token, so calibration must fall back to EOS and rely on attention_mask.
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=259,
            special_tokens=["[PAD]", "[BOS]", "[EOS]"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator([" ".join(WORDS)], trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="[EOS]", bos_token="[BOS]")
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "[CLS]": 4, "[SEP]": 5}
    vocab.update({word: 6 + i for i, word in enumerate(WORDS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 4), ("[SEP]", 5)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def build_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kwargs, **overrides}))
    model.config.architectures = [model_cls.__name__]
    return model.eval()


def save_model(path: Path, arch: str, seed: int = 0, **overrides) -> Path:
    model = build_model(arch, seed, **overrides)
    model.save_pretrained(path)
    make_tokenizer(arch in CLASSIFIERS).save_pretrained(path)
    return path


def load_reference_model(model_dir) -> torch.nn.Module:
    """The model in float32 on the CPU, loaded with the Auto class its head needs (for reference computations)."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    auto = transformers.AutoModelForCausalLM
    if config.architectures[0].endswith("ForSequenceClassification"):
        auto = transformers.AutoModelForSequenceClassification
    return auto.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_gradients_of(model_dir, examples):
    """Per-example mask gradients (N, L, H) and (N, L, D) of ``examples`` = [(inputs, labels)]: batch of one, no
    padding, masks as explicit tensors, and HF's own loss (mean over the example's labelled next tokens, or CE)."""
    from mergekit_fisher_mask import NodeShape, get_architecture

    model = load_reference_model(model_dir)
    shape = NodeShape.from_config(model.config)
    spec = get_architecture(shape.model_type)
    layers = model.base_model.get_submodule(spec.layers)
    head_grads, ffn_grads = [], []
    for inputs, target in examples:
        head_mask = torch.ones(shape.num_layers, shape.num_heads, requires_grad=True)
        ffn_mask = torch.ones(shape.num_layers, shape.intermediate_size, requires_grad=True)
        handles = []
        for l, layer in enumerate(layers):
            def scale_heads(module, args, l=l):
                x = args[0]  # (1, T, H * d)
                chunks = x.chunk(shape.num_heads, dim=-1)
                return (torch.cat([c * head_mask[l, h] for h, c in enumerate(chunks)], dim=-1),)

            def scale_neurons(module, args, l=l):
                return (args[0] * ffn_mask[l],)

            handles.append(layer.get_submodule(spec.head_module).register_forward_pre_hook(scale_heads))
            handles.append(layer.get_submodule(spec.neuron_module).register_forward_pre_hook(scale_neurons))
        try:
            loss = model(**inputs, labels=target).loss
            head_grad, ffn_grad = torch.autograd.grad(loss, [head_mask, ffn_mask])
        finally:
            for handle in handles:
                handle.remove()
        head_grads.append(head_grad)
        ffn_grads.append(ffn_grad)
    return torch.stack(head_grads), torch.stack(ffn_grads), model


def reference_gradients(model_dir, texts, labels):
    """As :func:`reference_gradients_of`, tokenizing ``texts`` (tuples of fields); LMs predict every next token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = []
    for n, text in enumerate(texts):
        inputs = tokenizer(*text, return_tensors="pt")
        examples.append((inputs, inputs["input_ids"] if labels is None else torch.tensor([labels[n]])))
    return reference_gradients_of(model_dir, examples)


def assert_close(actual, expected, rel=1e-5):
    scale = expected.abs().max()
    assert scale > 0, "reference Fisher is all zero: the test would prove nothing"
    error = (actual - expected).abs().max() / scale
    assert error < rel, f"relative error {error:.2e}"


def random_text(generator: torch.Generator, low: int = 3, high: int = 12) -> str:
    length = int(torch.randint(low, high, (1,), generator=generator))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def text_data(tmp_path) -> Path:
    """40 labelled examples of varied length, classes 0..2."""
    generator = torch.Generator().manual_seed(1)
    rows = [{"text": random_text(generator), "label": i % 3} for i in range(40)]
    return write_jsonl(tmp_path / "data.jsonl", rows)


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory) -> Callable[..., Path]:
    """Save tiny models lazily, once per (arch, seed, overrides) for the whole session."""
    root = tmp_path_factory.mktemp("zoo")
    cache: Dict[tuple, Path] = {}

    def get(arch: str, seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{arch}-{seed}" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            cache[key] = save_model(root / name, arch, seed, **overrides)
        return cache[key]

    return get
