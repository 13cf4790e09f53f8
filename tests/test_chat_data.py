"""Chat and completion data: rendered with the tokenizer's own chat template, loss on assistant/completion tokens only.

The reference marks the scored tokens independently, with transformers' ``return_assistant_tokens_mask`` (the
template's ``{% generation %}`` blocks) or the prompt's own token count, and takes HF's loss with -100 elsewhere.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from conftest import WORDS, assert_close, make_tokenizer, reference_fisher, write_jsonl
from transformers import AutoTokenizer

from mergekit_fisher_mask import CalibrationDataError, CalibrationSettings, Task, calibrate
from mergekit_fisher_mask.calibration.data import select_examples

# ChatML, with generation blocks around what an assistant turn says (its end-of-turn token included).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SETTINGS = CalibrationSettings(samples=6, batch_size=4)


@pytest.fixture
def chat_model(model_zoo, tmp_path):
    folder = tmp_path / "chat-llama"
    shutil.copytree(model_zoo("llama"), folder)
    tokenizer = make_tokenizer(False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def words(generator, low=2, high=6) -> str:
    count = int(torch.randint(low, high, (1,), generator=generator))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (count,), generator=generator))


def conversations(count=6):
    generator = torch.Generator().manual_seed(5)
    rows = []
    for i in range(count):
        turns = [{"role": "system", "content": words(generator)}] if i % 2 else []
        for _ in range(1 + i % 2):  # one or two exchanges
            turns += [{"role": "user", "content": words(generator)}, {"role": "assistant", "content": words(generator)}]
        rows.append({"messages": turns})
    return rows


def reference(model_dir, data_path, examples_to_inputs):
    data = select_examples(str(data_path), samples=6, seed=0, task=Task.CAUSAL_LM)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return reference_fisher(model_dir, [examples_to_inputs(tokenizer, fields) for fields in data.examples])


def test_messages_loss_is_on_assistant_turns(chat_model, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations())
    fisher = calibrate(str(chat_model), str(data), tmp_path / "f.safetensors", SETTINGS, progress=False)

    def inputs(tokenizer, fields):
        encoded = tokenizer.apply_chat_template(fields[0], return_dict=True, return_assistant_tokens_mask=True,
                                                return_tensors="pt")
        scored = encoded.pop("assistant_masks").bool()
        assert scored.any()
        labels = encoded["input_ids"].masked_fill(~scored, -100)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, {"labels": labels}

    expected = reference(chat_model, data, inputs)
    assert fisher.data["kind"] == "chat" and fisher.samples == 6
    assert_close(fisher.groups["head_fisher"], expected["head_fisher"])
    assert_close(fisher.groups["ffn_fisher"], expected["ffn_fisher"])


def test_prompt_completion_strings_score_the_completion(chat_model, tmp_path):
    generator = torch.Generator().manual_seed(6)
    rows = [{"prompt": words(generator), "completion": " " + words(generator)} for _ in range(6)]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    fisher = calibrate(str(chat_model), str(data), tmp_path / "f.safetensors", SETTINGS, progress=False)

    def inputs(tokenizer, fields):
        prompt, completion = fields
        encoded = tokenizer(prompt + completion, return_tensors="pt")
        labels = encoded["input_ids"].clone()
        labels[0, : len(tokenizer(prompt)["input_ids"])] = -100
        return dict(encoded), {"labels": labels}

    expected = reference(chat_model, data, inputs)
    assert fisher.data["kind"] == "completion"
    assert_close(fisher.groups["head_fisher"], expected["head_fisher"])
    assert_close(fisher.groups["ffn_fisher"], expected["ffn_fisher"])


def test_conversational_prompt_completion_scores_the_completion_turns(chat_model, tmp_path):
    rows = [{"prompt": c["messages"][:-1], "completion": c["messages"][-1:]} for c in conversations()]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    fisher = calibrate(str(chat_model), str(data), tmp_path / "f.safetensors", SETTINGS, progress=False)

    def inputs(tokenizer, fields):
        prompt, completion = fields
        encoded = tokenizer.apply_chat_template(prompt + completion, return_dict=True,
                                                return_assistant_tokens_mask=True, return_tensors="pt")
        scored = encoded.pop("assistant_masks").bool().view(1, -1)
        # Only the last assistant turn (the completion) counts: unmark the assistant turns inside the prompt.
        before = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"].shape[1]
        scored[0, :before] = False
        labels = encoded["input_ids"].masked_fill(~scored, -100)
        return {k: encoded[k] for k in ("input_ids", "attention_mask")}, {"labels": labels}

    expected = reference(chat_model, data, inputs)
    assert_close(fisher.groups["head_fisher"], expected["head_fisher"])
    assert_close(fisher.groups["ffn_fisher"], expected["ffn_fisher"])


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"messages": [{"role": "user", "content": "w1 w2"}]}], "the conversation has no assistant turn"),
        ([{"messages": [{"role": "user", "text": "w1"}, {"role": "assistant", "content": "w2"}]}],
         r"a conversation must be a list of \{role, content\} turns"),
    ],
)
def test_bad_conversations(chat_model, tmp_path, rows, match):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CalibrationDataError, match=f"row 1: {match}"):
        calibrate(str(chat_model), str(data), tmp_path / "f.safetensors", SETTINGS, progress=False)


def test_a_tokenizer_without_chat_template(model_zoo, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations())
    with pytest.raises(CalibrationDataError, match="the tokenizer has no chat template"):
        calibrate(str(model_zoo("llama")), str(data), tmp_path / "f.safetensors", SETTINGS, progress=False)


def test_conversations_truncated_before_the_answer_are_dropped(chat_model, tmp_path, caplog):
    long_prompt = [{"role": "user", "content": " ".join(WORDS)}, {"role": "assistant", "content": "w1 w2"}]
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(3) + [{"messages": long_prompt}])
    settings = CalibrationSettings(samples=4, batch_size=4, max_length=60)
    with caplog.at_level(logging.WARNING):
        fisher = calibrate(str(chat_model), str(data), tmp_path / "f.safetensors", settings, progress=False)
    assert fisher.samples == 3 and "dropped 1 example(s) with no token to take the loss on" in caplog.text
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"messages": long_prompt}])
    with pytest.raises(CalibrationDataError, match="no example has a token to take the loss on"):
        calibrate(str(chat_model), str(only_long), tmp_path / "g.safetensors", settings, progress=False)
