"""Smoke test of examples/paper_protocol: tiny random encoder, two tiny tasks, every method, real report files.

Keeps the example from silently rotting; the real run is `python examples/paper_protocol/run.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_tokenizer, random_text

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str, path: Path):
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def tiny_task(cache: Path, assets, name: str, classes: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(48):
        text = random_text(generator)
        rows.append({"text": text, "label": len(text.split()) % classes})  # learnable from length
    return assets.write_task(cache, name, rows[:36], rows[36:], [f"c{i}" for i in range(classes)], {})


def test_paper_protocol_pipeline_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    assets = load_example("assets", EXAMPLES / "assets.py")
    finetune_classifier = load_example("finetune_classifier", EXAMPLES / "finetune_classifier.py")
    protocol = load_example("paper_protocol_run", EXAMPLES / "paper_protocol" / "run.py")
    monkeypatch.setattr(protocol, "SAMPLES", (8, 16))  # the real run uses 128 and 512

    start = tmp_path / "start"  # a bare encoder, like the MiniLM checkpoint
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=66, pad_token_id=0,
    )).save_pretrained(start)
    make_tokenizer(True).save_pretrained(start)

    task_dirs = {"two": tiny_task(tmp_path, assets, "two", 2, 0), "three": tiny_task(tmp_path, assets, "three", 3, 1)}
    models = {t: tmp_path / "models" / t for t in task_dirs}
    reports = {t: finetune_classifier.finetune(start, task_dirs[t], models[t], max_train=36, batch_size=12, lr=1e-3)
               for t in task_dirs}
    methods = {"linear", "fisher_mask paper, none, batch est. (authors)", "fisher (full, L2-normalized), 128 samples"}
    chosen = [m for m in protocol.METHODS if (m.name in methods or m.uses_base) and m.name != "linear"]
    chosen.append(next(m for m in protocol.METHODS if m.name == "linear"))  # last: its cell is recomputed below
    # The real run's 128/512-sample Fisher files are the 8/16-sample ones here.
    chosen = [dataclasses.replace(m, fisher=m.fisher.replace("512", "16").replace("128", "8")) for m in chosen]
    monkeypatch.setattr(protocol, "METHODS", chosen)
    results = tmp_path / "results"
    report = protocol.run_protocol(models, task_dirs, start, tmp_path / "work", results, 12, reports, time.time())

    assert set(report["methods"]) == {m.name for m in protocol.METHODS}
    for entry in report["methods"].values():
        cell = entry["per_combo"]["two+three"]
        assert set(cell["accuracy"]) == {"two", "three"} and all(0 <= a <= 1 for a in cell["accuracy"].values())
        assert cell["normalized"] == pytest.approx(
            sum(cell["accuracy"][t] / report["tasks"][t]["individual_accuracy_capped"] for t in ("two", "three")) / 2)
    # Scoring a merge must leave the task models as they were: every later merge reads them.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task_models = {t: AutoModelForSequenceClassification.from_pretrained(models[t]) for t in models}
    bodies = {t: {k: v.clone() for k, v in protocol.body(m.state_dict()).items()} for t, m in task_models.items()}
    tests = {t: protocol.TestSet(task_dirs[t], AutoTokenizer.from_pretrained(models[t]), 12) for t in models}
    merged = protocol.merge(chosen[-1], ["two", "three"], bodies, None, {})
    protocol.score(merged, ["two", "three"], task_models, bodies, tests)
    for task, model in task_models.items():
        for name, value in protocol.body(model.state_dict()).items():
            assert torch.equal(value, bodies[task][name]), name
    assert json.loads((results / "results.json").read_text()) == report
    assert "| linear |" in (results / "results.md").read_text()
    for png in ("normalized_accuracy.png", "heatmaps.png"):
        assert (results / png).stat().st_size > 1000


def test_gpu_check_dry_run(tmp_path, capsys):
    """examples/gpu_check/run.py cannot rot between the rare sessions that have a GPU: its CPU dry run runs here."""
    gpu_check = load_example("gpu_check_run", EXAMPLES / "gpu_check" / "run.py")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for variant in gpu_check.VARIANTS:
        entry = report["passes"]["tiny"][variant]
        assert entry["forward"]["seconds"] > 0 and entry["mask"]["seconds"] > 0 and entry["micro_batch"] >= 1
        assert entry["gram"]["seconds"] > 0
    offload = report["offload"]
    assert offload["device map"]["checkpointing"] and offload["head_fisher_max_rel_diff"] < 1e-5
    assert report["merge"]["linear_seconds"] > 0 and report["merge"]["fisher_mask_seconds"] > 0
    assert (tmp_path / "work" / "merged-fisher_mask" / "fisher_merge.json").is_file()
    assert "| tiny | float32 |" in capsys.readouterr().out
