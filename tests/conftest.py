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

from mergekit_fisher_mask.tasks import Task, task_of  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
VOCAB_SIZE = 48  # encoders: word-level vocabulary
DECODER_VOCAB_SIZE = 320  # decoders: byte-level BPE (259 tokens, as Qwen2's tokenizer class insists on) + room
SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
DECODER = dict(SIZE, vocab_size=DECODER_VOCAB_SIZE, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ENCODER = dict(SIZE, vocab_size=VOCAB_SIZE, max_position_embeddings=66, num_labels=3)

T = transformers
MOE = dict(num_key_value_heads=2, num_experts_per_tok=2)
T5 = dict(vocab_size=DECODER_VOCAB_SIZE, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
          feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)

# name -> (config class, model class, config kwargs). Each family's quirks are exercised: GQA; q/k/v biases (qwen2,
# stablelm, starcoder2, phi); explicit head_dim != hidden/heads (qwen3, gemma*, qwen3_moe); fused transposed Conv1D
# (gpt2); fused [q|k|v] rows (phi3, modernbert) and per-head [q_h|k_h|v_h] (gpt_neox); fused [gate|up] (phi3,
# modernbert); post-norms (gemma2/3, olmo2); routed experts (mixtral, qwen*_moe) and a shared expert (qwen2_moe);
# T5's two stacks with cross-attention and d_kv * heads != d_model, and different encoder and decoder depths.
ARCHS: Dict[str, Tuple[Callable, Callable, dict]] = {
    "bert": (T.BertConfig, T.BertForSequenceClassification, dict(ENCODER, pad_token_id=0)),
    "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification, dict(ENCODER, pad_token_id=0)),
    "xlm-roberta": (T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification, dict(ENCODER, pad_token_id=0)),
    "distilbert": (T.DistilBertConfig, T.DistilBertForSequenceClassification,
                   dict(vocab_size=VOCAB_SIZE, dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=66,
                        pad_token_id=0, num_labels=3)),
    "deberta-v2": (T.DebertaV2Config, T.DebertaV2ForSequenceClassification,
                   dict(ENCODER, pad_token_id=0, relative_attention=True, pos_att_type=["p2c", "c2p"],
                        max_relative_positions=-1, position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                        position_biased_input=False)),
    "modernbert": (T.ModernBertConfig, T.ModernBertForSequenceClassification,
                   dict(ENCODER, pad_token_id=0, bos_token_id=4, eos_token_id=5, cls_token_id=4, sep_token_id=5,
                        global_attn_every_n_layers=2, local_attention=16)),
    "bert-tokens": (T.BertConfig, T.BertForTokenClassification, dict(ENCODER, pad_token_id=0)),
    "bert-qa": (T.BertConfig, T.BertForQuestionAnswering, dict(ENCODER, pad_token_id=0, num_labels=2)),
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(DECODER, num_key_value_heads=2)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(DECODER, num_key_value_heads=2)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(DECODER, num_key_value_heads=2)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(DECODER, num_key_value_heads=2, head_dim=16)),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, dict(DECODER, num_key_value_heads=2, logits_scaling=4.0)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(DECODER, num_key_value_heads=2, head_dim=16)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM,
               dict(DECODER, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                    final_logit_softcapping=2.0)),
    "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
                    dict(DECODER, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                         final_logit_softcapping=2.0)),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, dict(DECODER, num_key_value_heads=2)),
    "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, dict(DECODER, num_key_value_heads=2, use_qkv_bias=True)),
    "starcoder2": (T.Starcoder2Config, T.Starcoder2ForCausalLM, dict(DECODER, num_key_value_heads=2)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(DECODER, num_key_value_heads=2)),
    "phi": (T.PhiConfig, T.PhiForCausalLM, dict(DECODER)),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForSequenceClassification, dict(DECODER, num_labels=3)),
    # Pythia-style causal LM: merges through the plugin's corrected mergekit definition (mergekit 0.1.5's own lists
    # attention buffers that transformers 5 no longer saves).
    "gpt_neox-lm": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(DECODER)),
    "gpt2": (
        T.GPT2Config,
        T.GPT2LMHeadModel,
        dict(vocab_size=DECODER_VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    ),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(DECODER, **MOE, num_local_experts=4)),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                  dict(DECODER, **MOE, head_dim=16, num_experts=4, moe_intermediate_size=16, mlp_only_layers=[])),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
                  dict(DECODER, **MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       mlp_only_layers=[])),
    "t5": (T.T5Config, T.T5ForConditionalGeneration, T5),
    "mt5": (T.MT5Config, T.MT5ForConditionalGeneration, T5),
    "umt5": (T.UMT5Config, T.UMT5ForConditionalGeneration, T5),
}
# Families whose tokenizer is the word-level one (encoders); the others use the byte-level BPE one.
CLASSIFIERS = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "modernbert", "bert-tokens", "bert-qa")


def task_of_arch(arch: str) -> Task:
    return task_of(_config(arch))


def _config(arch: str):
    config_cls, model_cls, kwargs = ARCHS[arch]
    config = config_cls(**kwargs)
    config.architectures = [model_cls.__name__]
    return config


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
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 4), ("[SEP]", 5)]
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
    auto = getattr(transformers, task_of(config).auto_class)
    return auto.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_gradients_of(model_dir, examples):
    """Per-example mask gradients of ``examples`` = [(inputs, loss keyword arguments)], one dict per example:
    {group key: (L, ...)}. Independent of the package's hooks: batch of one, no padding, HF's own loss, and the
    identity ``dL/dm_c = sum_r W[r, c] dL/dW[r, c]`` for the weight whose input channel c a node scales (summed over
    a head's head_dim channels)."""
    from mergekit_fisher_mask import NodeShape, get_architecture
    from mergekit_fisher_mask.architectures import Kind

    model = load_reference_model(model_dir)
    shape = NodeShape.from_config(model.config)
    spec = get_architecture(shape.model_type)
    weights = []  # (group key, layer, kind, axis, weight)
    for stack in spec.stacks:
        layers = model.base_model.get_submodule(stack.layers)
        for group, site in stack.sites.items():
            for index, layer in enumerate(layers):
                weight = getattr(layer.get_submodule(site.module), site.weight)
                weights.append((stack.key(group), index, site.kind, site.input_axis, weight))
    results = []
    for inputs, targets in examples:
        loss = model(**inputs, **targets).loss
        grads = torch.autograd.grad(loss, [w for *_, w in weights])
        per_group = {}
        for (key, layer, kind, axis, weight), grad in zip(weights, grads):
            product = (weight.detach() * grad).movedim(axis, -1)  # input channels last
            if kind == Kind.EXPERTS:
                node = product.sum(dim=1)  # [E, H, I] -> (E, I)
            else:
                node = product.reshape(-1, product.shape[-1]).sum(dim=0)  # (channels,)
                if kind == Kind.HEADS:
                    node = node.view(shape.num_heads, -1).sum(dim=1)  # (H,): a head sums its head_dim channels
            per_group.setdefault(key, {})[layer] = node
        results.append({key: torch.stack([rows[i] for i in sorted(rows)]) for key, rows in per_group.items()})
    return results, model


def reference_fisher(model_dir, examples):
    """The empirical mask Fisher (1/N) sum_n (dL_n/dm)^2 by the reference above."""
    per_example, _ = reference_gradients_of(model_dir, examples)
    return {key: torch.stack([g[key] ** 2 for g in per_example]).mean(0) for key in per_example[0]}


def reference_examples(model_dir, data_path, samples, **select):
    """Select examples as calibration does, then build each one's inputs and HF loss arguments independently."""
    from mergekit_fisher_mask.calibration.data import select_examples

    config = transformers.AutoConfig.from_pretrained(model_dir)
    task = task_of(config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    data = select_examples(str(data_path), samples=samples, seed=0, task=task,
                           needs_labels=task in (Task.CLASSIFICATION, Task.TOKEN_CLASSIFICATION), **select)
    examples = []
    for n, fields in enumerate(data.examples):
        if task == Task.TOKEN_CLASSIFICATION:
            inputs = tokenizer(fields[0], is_split_into_words=True, return_tensors="pt")
            words = inputs.word_ids()
            tags = data.labels[n]
            labels = [tags[w] if w is not None and (i == 0 or words[i - 1] != w) else -100 for i, w in enumerate(words)]
            examples.append((inputs, {"labels": torch.tensor([labels])}))
        elif task == Task.QUESTION_ANSWERING:
            question, context, answers = fields
            inputs = tokenizer(question, context, return_tensors="pt")
            first = answers["answer_start"][0]
            last = first + len(answers["text"][0]) - 1
            span = {"start_positions": torch.tensor([inputs.char_to_token(0, first, sequence_index=1)]),
                    "end_positions": torch.tensor([inputs.char_to_token(0, last, sequence_index=1)])}
            examples.append((inputs, span))
        elif task == Task.SEQ2SEQ:
            inputs = tokenizer(fields[0], return_tensors="pt")
            examples.append((inputs, {"labels": tokenizer(text_target=fields[1], return_tensors="pt")["input_ids"]}))
        else:
            inputs = tokenizer(*fields, return_tensors="pt")
            target = inputs["input_ids"] if task == Task.CAUSAL_LM else torch.tensor([data.labels[n]])
            examples.append((inputs, {"labels": target}))
    return examples


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


def task_rows(task: Task, count: int = 40, seed: int = 1) -> list:
    """Rows of varied length for a model with ``task``: labels 0..2, tags, answers or targets."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        text = random_text(generator)
        if task == Task.TOKEN_CLASSIFICATION:
            words = text.split()
            rows.append({"tokens": words, "ner_tags": [(i + j) % 3 for j in range(len(words))]})
        elif task == Task.QUESTION_ANSWERING:
            context = random_text(generator, 6, 14)
            words = context.split()
            answer = " ".join(words[2 : 2 + 1 + i % 3])
            rows.append({"question": random_text(generator, 2, 5), "context": context,
                         "answers": {"text": [answer], "answer_start": [context.index(answer)]}})
        elif task == Task.SEQ2SEQ:
            rows.append({"text": text, "target": random_text(generator, 2, 8)})
        else:
            rows.append({"text": text, "label": i % 3})
    return rows


def data_for(arch: str, folder: Path, count: int = 40) -> Path:
    """A jsonl file of calibration data that fits ``arch``'s task."""
    path = folder / f"data-{task_of_arch(arch).value}.jsonl"
    return path if path.exists() else write_jsonl(path, task_rows(task_of_arch(arch), count))


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
