"""Calibration against a deliberately simple reference: one example at a time, explicit masks, HF's own loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    ARCHS,
    assert_close,
    build_model,
    data_for,
    load_reference_model,
    reference_examples,
    reference_fisher,
    reference_gradients_of,
)
from safetensors import safe_open
from transformers import AutoTokenizer

from mergekit_fisher_mask import CalibrationSettings, calibrate, load_mask_fisher
from mergekit_fisher_mask.architectures import NodeShape
from mergekit_fisher_mask.calibration.data import select_examples


def assert_groups_close(actual, expected, rel=1e-5):
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for key in expected:
        assert_close(actual[key], expected[key], rel)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_empirical_fisher_matches_single_example_reference(arch, model_zoo, tmp_path):
    model_dir = model_zoo(arch)
    data = data_for(arch, tmp_path)
    out = tmp_path / "fisher.safetensors"
    fisher = calibrate(str(model_dir), str(data), out, CalibrationSettings(samples=10, batch_size=4), progress=False)
    assert fisher.samples == 10
    assert_groups_close(fisher.groups, reference_fisher(model_dir, reference_examples(model_dir, data, 10)))
    stored = load_mask_fisher(out)
    assert all(torch.equal(stored.groups[key], value) for key, value in fisher.groups.items())


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2", "mixtral", "t5", "bert-tokens", "bert-qa"])
def test_batch_size_and_padding_do_not_change_the_result(arch, model_zoo, tmp_path):
    results = [
        calibrate(
            str(model_zoo(arch)), str(data_for(arch, tmp_path)), tmp_path / f"b{b}.safetensors",
            CalibrationSettings(samples=12, batch_size=b), progress=False,
        )
        for b in (1, 5, 12)
    ]
    for other in results[1:]:
        assert_groups_close(other.groups, results[0].groups)


@pytest.mark.parametrize("estimator", ["empirical", "batch"])
def test_micro_batches_do_not_change_the_result(estimator, model_zoo, text_data, tmp_path):
    """Batches split into micro-batches (and trimmed to each one's longest example) give the same Fisher."""
    results = [
        calibrate(
            str(model_zoo("llama")), str(text_data), tmp_path / f"m{micro}.safetensors",
            CalibrationSettings(samples=12, batch_size=6, estimator=estimator, micro_batch_size=micro), progress=False,
        )
        for micro in (None, 1, 4)
    ]
    for other in results[1:]:
        assert_groups_close(other.groups, results[0].groups)


def test_automatic_micro_batch_size_bounds_activations():
    from mergekit_fisher_mask.calibration import auto_micro_batch_size

    smollm2 = NodeShape("llama", 30, 9, 3, 64, 1536, 576)
    minilm = NodeShape("bert", 6, 12, 12, 32, 1536, 384)
    cpu = 1 << 30  # the CPU budget
    assert 4 <= auto_micro_batch_size(smollm2, 128, cpu) <= 8  # 32 x 128 tokens would hold ~4.6 GB of activations
    assert auto_micro_batch_size(minilm, 64, cpu) >= 32  # MiniLM's batches run whole
    assert auto_micro_batch_size(smollm2, 100_000, cpu) == 1
    # Under checkpointing only layer inputs are kept, so many more examples fit; half-precision doubles that again.
    checkpointed = auto_micro_batch_size(smollm2, 128, cpu, checkpointing=True)
    assert checkpointed >= 8 * auto_micro_batch_size(smollm2, 128, cpu)
    assert auto_micro_batch_size(smollm2, 128, cpu, dtype_bytes=2, checkpointing=True) >= 2 * checkpointed - 1


@pytest.mark.parametrize("arch", ["bert", "llama", "qwen2_moe"])
def test_batch_estimator_squares_each_batch_mean_gradient(arch, model_zoo, tmp_path):
    model_dir, data = model_zoo(arch), data_for(arch, tmp_path)
    fisher = calibrate(
        str(model_dir), str(data), tmp_path / "f.safetensors",
        CalibrationSettings(samples=10, batch_size=4, estimator="batch"), progress=False,
    )
    grads, _ = reference_gradients_of(model_dir, reference_examples(model_dir, data, 10))
    batches = [grads[0:4], grads[4:8], grads[8:10]]
    expected = {key: sum(torch.stack([g[key] for g in b]).mean(0) ** 2 for b in batches) for key in grads[0]}
    assert_groups_close(fisher.groups, expected)
    assert fisher.estimator == "batch"


def test_expected_estimator_matches_reference(model_zoo, text_data, tmp_path):
    model_dir = model_zoo("bert")
    fisher = calibrate(
        str(model_dir), str(text_data), tmp_path / "f.safetensors",
        CalibrationSettings(samples=6, batch_size=4, estimator="expected"), progress=False,
    )
    examples = reference_examples(model_dir, text_data, 6)
    model = load_reference_model(model_dir)
    probs = torch.stack([model(**inputs).logits.softmax(-1)[0] for inputs, _ in examples]).detach()  # (N, C)
    expected = {}
    for c in range(3):
        # CE with label c is -log p(c|x): its squared gradient is the squared gradient of log p(c|x).
        grads, _ = reference_gradients_of(model_dir, [(inputs, {"labels": torch.tensor([c])}) for inputs, _ in examples])
        for key in grads[0]:
            weighted = torch.stack([p * g[key] ** 2 for p, g in zip(probs[:, c], grads)]).mean(0)
            expected[key] = expected.get(key, 0) + weighted
    assert_groups_close(fisher.groups, expected)


def test_sampled_estimator_is_reproducible_and_differs_from_empirical(model_zoo, text_data, tmp_path):
    settings = CalibrationSettings(samples=12, batch_size=4, estimator="sampled", seed=3)
    first = calibrate(str(model_zoo("llama")), str(text_data), tmp_path / "a.safetensors", settings, progress=False)
    again = calibrate(str(model_zoo("llama")), str(text_data), tmp_path / "b.safetensors", settings, progress=False)
    empirical = calibrate(
        str(model_zoo("llama")), str(text_data), tmp_path / "c.safetensors",
        CalibrationSettings(samples=12, batch_size=4, seed=3), progress=False,
    )
    assert torch.equal(first.groups["head_fisher"], again.groups["head_fisher"])
    assert not torch.allclose(first.groups["head_fisher"], empirical.groups["head_fisher"])
    assert (first.groups["head_fisher"] > 0).all()


def test_chunked_lm_loss_equals_unchunked(model_zoo):
    from mergekit_fisher_mask.calibration.losses import causal_lm_losses

    model = build_model("llama")
    batch = {"input_ids": torch.randint(3, 200, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    batch["attention_mask"][1, 6:] = 0
    whole = causal_lm_losses(model, batch, chunk_bytes=10**9)
    tiny = causal_lm_losses(model, batch, chunk_bytes=1)  # one position per chunk
    torch.testing.assert_close(whole, tiny)
    reference = model(input_ids=batch["input_ids"][:1], labels=batch["input_ids"][:1]).loss
    torch.testing.assert_close(whole[0], reference)


def test_fused_frozen_head_loss_matches_autograd():
    """With a frozen head the loss and its gradient come from the fused path; both must equal plain autograd."""
    from mergekit_fisher_mask.calibration.losses import causal_lm_losses

    model = build_model("qwen3")
    batch = {"input_ids": torch.randint(3, 200, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    batch["attention_mask"][2, 4:] = 0
    embeddings = model.get_input_embeddings()
    scale = torch.ones(3, 1, 1, requires_grad=True)  # a per-example input scale to differentiate against
    handle = embeddings.register_forward_hook(lambda module, args, out: out * scale)
    try:
        plain = causal_lm_losses(model, batch, chunk_bytes=1)  # head requires grad: checkpointed chunks
        (g_plain,) = torch.autograd.grad(plain.sum() + 2 * plain[1], scale)
        model.requires_grad_(False)
        fused = causal_lm_losses(model, batch, chunk_bytes=1)
        (g_fused,) = torch.autograd.grad(fused.sum() + 2 * fused[1], scale)
    finally:
        handle.remove()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(g_fused, g_plain)


def test_parameters_stay_untouched(model_zoo, text_data, tmp_path):
    from mergekit_fisher_mask import compute_mask_fisher
    from mergekit_fisher_mask.calibration.data import CalibrationDataset, encode_labels, prepare_tokenizer

    model_dir = model_zoo("bert")
    model = load_reference_model(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = select_examples(str(text_data), samples=8, seed=0, needs_labels=True)
    dataset = CalibrationDataset(
        data, prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir)), max_length=32,
        labels=encode_labels(data, model.config, source="test"), source="test",
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=dataset.collate)
    model.train()
    compute_mask_fisher(model, loader, progress=False)
    assert model.training, "train/eval mode is restored"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad is restored"
    assert all(p.grad is None for p in model.parameters()), "no weight gradient was computed"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_file_metadata_describes_model_and_data(model_zoo, text_data, tmp_path):
    out = tmp_path / "f.safetensors"
    calibrate(str(model_zoo("llama")), str(text_data), out, CalibrationSettings(samples=7, batch_size=3), progress=False)
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("head_fisher").dtype == torch.float32
        assert tuple(handle.get_tensor("ffn_fisher").shape) == (2, 48)
    assert meta["format"] == "mergekit-fisher-mask/mask" and meta["format_version"] == "2"
    assert (meta["model_type"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == ("llama", "4", "2", "8")
    assert (meta["samples"], meta["estimator"], meta["loss"]) == ("7", "empirical", "causal_lm")
    assert meta["fingerprint"].startswith("st:")
    data = json.loads(meta["data"])
    assert data["source"] == str(text_data) and data["text_columns"] == ["text"]
    assert data["settings"]["batch_size"] == 3


def test_two_processes_equal_one(model_zoo, text_data, tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo) must give the single-process file to float round-off."""
    model_dir = model_zoo("bert")
    args = ["calibrate", str(model_dir), "--data", str(text_data), "--samples", "11", "--batch-size", "3", "--quiet"]
    single = tmp_path / "one.safetensors"
    double = tmp_path / "two.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "mergekit_fisher_mask", *args, "--out", str(single)], check=True, env=env)
    # --multi_gpu selects accelerate's torchrun launcher; with no GPU each process runs on CPU with gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mergekit_fisher_mask"]
    subprocess.run([*launch, *args, "--out", str(double)], check=True, env=env)
    one, two = load_mask_fisher(single), load_mask_fisher(double)
    assert one.samples == two.samples == 11
    assert_close(two.groups["head_fisher"], one.groups["head_fisher"])
    assert_close(two.groups["ffn_fisher"], one.groups["ffn_fisher"])
    assert two.data["processes"] == 2


def test_bf16_mixed_precision_stays_close_to_fp32(model_zoo, text_data, tmp_path):
    model_dir = str(model_zoo("llama"))
    fp32 = calibrate(model_dir, str(text_data), tmp_path / "a.safetensors", CalibrationSettings(samples=8), progress=False)
    bf16 = calibrate(
        model_dir, str(text_data), tmp_path / "b.safetensors",
        CalibrationSettings(samples=8, mixed_precision="bf16"), progress=False,
    )
    assert bf16.groups["head_fisher"].dtype == torch.float32 and torch.isfinite(bf16.groups["head_fisher"]).all()
    # bf16 keeps ~3 significant digits; the per-head ranking and scale must survive.
    assert_close(bf16.groups["head_fisher"], fp32.groups["head_fisher"], rel=0.1)


def test_left_padded_batches_are_refused(model_zoo):
    """Micro-batches are trimmed on the right: a left-padded dataloader would lose real tokens, so it is refused."""
    from mergekit_fisher_mask import compute_mask_fisher
    from mergekit_fisher_mask.errors import FisherMaskError

    model = load_reference_model(model_zoo("bert"))
    batch = {"input_ids": torch.tensor([[0, 0, 4, 7, 5], [4, 7, 8, 9, 5]]),
             "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), "labels": torch.tensor([0, 1])}
    with pytest.raises(FisherMaskError, match="not right-padded"):
        compute_mask_fisher(model, [batch], progress=False)
