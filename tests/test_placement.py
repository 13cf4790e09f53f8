"""Placement never changes the result: device maps with CPU and disk offload, load dtypes, several processes."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import assert_close, random_text, write_jsonl

from mergekit_fisher_mask import CalibrationSettings, SettingsError, calibrate, calibrate_full, load_mask_fisher
from mergekit_fisher_mask.calibration import Placement, compute_mask_fisher, prepare_calibration
from mergekit_fisher_mask.merge.recipe import load_recipe
from mergekit_fisher_mask.pipeline import InputModel, calibration_cache_key

# Most layers go to disk: the budget holds the embeddings and little else.
OFFLOAD = dict(device_map="auto", max_memory="cpu=60KB")


@pytest.fixture
def data(tmp_path):
    generator = torch.Generator().manual_seed(3)
    return write_jsonl(tmp_path / "d.jsonl", [{"text": random_text(generator), "label": i % 3} for i in range(12)])


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_disk_offloaded_pass_equals_the_in_memory_one(arch, model_zoo, data, tmp_path):
    model = str(model_zoo(arch, num_hidden_layers=4))
    settings = dict(samples=12, batch_size=5, max_length=32)
    in_memory = calibrate(model, str(data), tmp_path / "a.safetensors", CalibrationSettings(**settings), progress=False)
    offload = tmp_path / "offload"
    mapped = CalibrationSettings(**settings, **OFFLOAD, offload_folder=str(offload))
    run = prepare_calibration(model, str(data), mapped)
    try:
        placement = Placement.of(run.model)
        assert sum(place == "disk" for place in placement.device_map.values()) >= 1, placement.device_map
        assert placement.checkpointing
        groups, count = compute_mask_fisher(run.model, run.loader, accelerator=run.accelerator, progress=False)
    finally:
        run.cleanup()
    assert count == 12
    assert_close(groups["head_fisher"], in_memory.groups["head_fisher"])
    assert_close(groups["ffn_fisher"], in_memory.groups["ffn_fisher"])
    assert not offload.exists(), "the run created the offload folder, so it removes it"
    through_api = calibrate(model, str(data), tmp_path / "b.safetensors", mapped, progress=False)
    assert_close(through_api.groups["head_fisher"], in_memory.groups["head_fisher"])


def test_two_processes_with_a_device_map_equal_one(model_zoo, data, tmp_path):
    model = model_zoo("llama", num_hidden_layers=4)
    args = ["calibrate", str(model), "--data", str(data), "--samples", "11", "--batch-size", "3", "--quiet",
            "--device-map", "auto", "--max-memory", "cpu=60KB", "--offload-folder", str(tmp_path / "offload")]
    single = calibrate(str(model), str(data), tmp_path / "one.safetensors",
                       CalibrationSettings(samples=11, batch_size=3), progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mergekit_fisher_mask"]
    subprocess.run([*launch, *args, "--out", str(tmp_path / "two.safetensors")], check=True, env=env)
    double = load_mask_fisher(tmp_path / "two.safetensors")
    assert double.samples == 11 and double.data["processes"] == 2
    assert_close(double.groups["head_fisher"], single.groups["head_fisher"])
    assert_close(double.groups["ffn_fisher"], single.groups["ffn_fisher"])


def test_bfloat16_weights_keep_float32_sums(model_zoo, data, tmp_path):
    model = str(model_zoo("llama"))
    fp32 = calibrate(model, str(data), tmp_path / "a.safetensors", CalibrationSettings(samples=8), progress=False)
    bf16 = calibrate(model, str(data), tmp_path / "b.safetensors", CalibrationSettings(samples=8, dtype="bfloat16"),
                     progress=False)
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    assert load_mask_fisher(tmp_path / "b.safetensors").dtype == "bfloat16"
    assert bf16.groups["head_fisher"].dtype == torch.float32 and torch.isfinite(bf16.groups["head_fisher"]).all()
    assert_close(bf16.groups["head_fisher"], fp32.groups["head_fisher"], rel=0.1)  # bf16 keeps ~3 significant digits


def test_auto_dtype_is_float32_on_a_cpu(model_zoo, data, tmp_path):
    fisher = calibrate(str(model_zoo("llama", torch_dtype="bfloat16")), str(data), tmp_path / "a.safetensors",
                       CalibrationSettings(samples=4), progress=False)
    assert fisher.dtype == "float32"


def test_full_fisher_refuses_a_device_map_before_loading(model_zoo, data, tmp_path):
    with pytest.raises(SettingsError, match="full Fisher needs the whole model on one device"):
        calibrate_full(str(model_zoo("llama")), str(data), tmp_path / "full",
                       CalibrationSettings(samples=4, device_map="auto"), progress=False)
    assert not (tmp_path / "full").exists()


def test_recipes_take_placement_and_the_cache_key_ignores_it(model_zoo, tmp_path):
    models = [str(model_zoo("llama", seed=s)) for s in (1, 2)]
    body = {
        "merge_method": "fisher_mask",
        "models": [{"model": m, "parameters": {"calibration_data": {"data": "d.jsonl", "device_map": "auto",
                                                                      "max_memory": {"cpu": "1GB"}}}} for m in models],
        "calibration": {"samples": 4, "micro_batch_size": 2, "offload_folder": str(tmp_path / "off")},
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(body))
    placed = load_recipe(str(path)).calibrations[0]
    assert placed.settings.device_map == "auto" and placed.settings.max_memory == {"cpu": "1GB"}
    body["models"][0]["parameters"]["calibration_data"] = "d.jsonl"
    body["calibration"] = {"samples": 4}
    path.write_text(yaml.safe_dump(body))
    plain = load_recipe(str(path)).calibrations[0]
    from transformers import AutoConfig

    model = InputModel(models[0], __import__("pathlib").Path(models[0]), AutoConfig.from_pretrained(models[0]))
    assert calibration_cache_key(placed, model) == calibration_cache_key(plain, model), "placement is not in the key"
    body["calibration"] = {"samples": 4, "dtype": "bfloat16"}
    path.write_text(yaml.safe_dump(body))
    bf16 = load_recipe(str(path)).calibrations[0]
    assert calibration_cache_key(bf16, model) != calibration_cache_key(plain, model), "dtype is in the key"


def test_each_process_gets_its_own_share_of_the_gpus(monkeypatch):
    """4 GPUs, 2 processes per node: rank 1 gets GPUs 2 and 3, the user's sizes where given, else 90% of free."""
    import importlib
    from types import SimpleNamespace

    placement = importlib.import_module("mergekit_fisher_mask.calibration.placement")
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 4)
    monkeypatch.setattr(placement, "accelerator_type", lambda: "cuda")
    monkeypatch.setattr(placement, "free_memory", lambda device: 10_000 * (device.index + 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    settings = CalibrationSettings(device_map="auto", max_memory="3=20GiB,cpu=10GiB")
    memory = placement._process_max_memory(settings, SimpleNamespace(num_processes=2, local_process_index=1))
    assert memory == {2: 27_000, 3: settings.max_memory[3], "cpu": settings.max_memory["cpu"]}
    monkeypatch.setattr(placement, "free_memory", lambda device: None)
    with pytest.raises(SettingsError, match="free memory of device 2 is unknown"):
        placement._process_max_memory(settings, SimpleNamespace(num_processes=2, local_process_index=1))


def test_gpu_budgets_follow_the_free_memory(monkeypatch):
    """On an accelerator, micro-batches and LM-loss chunks are sized from the memory really free; on a CPU, fixed."""
    placement_module = importlib.import_module("mergekit_fisher_mask.calibration.placement")
    monkeypatch.setattr(placement_module, "free_memory", lambda device: 40 * 2**30)
    gpu = Placement(torch.device("cuda", 0))
    assert gpu.activation_budget() == int(0.6 * 40 * 2**30)
    assert gpu.logits_chunk() == 2**30  # 5% of 40 GiB, capped at 1 GiB
    monkeypatch.setattr(placement_module, "free_memory", lambda device: 512 * 2**20)
    assert Placement(torch.device("cuda", 0)).logits_chunk() == 64 * 2**20  # never below the CPU's chunk
    cpu = Placement(torch.device("cpu"))
    assert cpu.activation_budget() == 2**30 and cpu.logits_chunk() == 64 * 2**20
