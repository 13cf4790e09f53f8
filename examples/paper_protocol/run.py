"""The paper's protocol on real offline assets: fine-tune MiniLM per task, calibrate, merge every pair and all
tasks with each method, and score the merged body with each task's own head.

    python examples/paper_protocol/run.py [--cache examples/.cache] [--test-cap 300]

Every step is cached under ``<cache>/paper_protocol`` (fine-tuned models, Fisher files, one JSON per merge
result), so a re-run skips finished work. Outputs go to ``examples/paper_protocol/results/``: ``results.json``
(every number), ``results.md`` (tables), ``normalized_accuracy.png`` and ``heatmaps.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXAMPLES = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(EXAMPLES))

import assets  # noqa: E402
import torch  # noqa: E402
from finetune_classifier import finetune, read_jsonl  # noqa: E402
from mergekit import merge_methods  # noqa: E402
from mergekit.merge_methods import merge_state_dicts  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import mergekit_fisher_mask as mfm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 64
SAMPLES = (128, 512)
ESTIMATORS = ("empirical", "batch")


@dataclass(frozen=True)
class Method:
    """One merge configuration: a mergekit method name, its parameters and which Fisher it reads."""

    name: str
    method: str
    parameters: Dict = field(default_factory=dict)
    fisher: str = ""  # "" (none), "mask-<samples>-<estimator>" or "full-<samples>"
    uses_base: bool = False


METHODS: List[Method] = [
    Method("linear", "linear", {"weight": 1.0}),
    Method("fisher (full, L2-normalized)", "fisher", {"normalize": True}, "full-512"),
    Method("fisher (full, raw)", "fisher", {"normalize": False}, "full-512"),
    Method("fisher_mask nodes, layer", "fisher_mask", {"scheme": "nodes", "normalize": "layer"}, "mask-512-empirical"),
    Method("fisher_mask nodes, model", "fisher_mask", {"scheme": "nodes", "normalize": "model"}, "mask-512-empirical"),
    Method("fisher_mask nodes, none", "fisher_mask", {"scheme": "nodes", "normalize": "none"}, "mask-512-empirical"),
    Method("fisher_mask paper, layer", "fisher_mask", {"scheme": "paper", "normalize": "layer"}, "mask-512-empirical"),
    Method("fisher_mask paper, none", "fisher_mask", {"scheme": "paper", "normalize": "none"}, "mask-512-empirical"),
    Method("fisher_mask paper, none, batch est. (authors)", "fisher_mask", {"scheme": "paper", "normalize": "none"},
           "mask-512-batch"),
    Method("fisher_mask nodes, layer, batch est.", "fisher_mask", {"scheme": "nodes", "normalize": "layer"},
           "mask-512-batch"),
    Method("fisher_mask nodes, layer, 128 samples", "fisher_mask", {"scheme": "nodes", "normalize": "layer"},
           "mask-128-empirical"),
    Method("fisher_mask nodes, layer, expected est.", "fisher_mask", {"scheme": "nodes", "normalize": "layer"},
           "mask-512-expected"),
    Method("fisher (full, L2-normalized), 128 samples", "fisher", {"normalize": True}, "full-128"),
    Method("ties (density 0.5)", "ties", {"weight": 1.0, "density": 0.5}, uses_base=True),
    Method("task_arithmetic (lambda 0.5)", "task_arithmetic", {"weight": 0.5}, uses_base=True),
]


def log(message: str) -> None:
    print(f"[paper_protocol {time.strftime('%H:%M:%S')}] {message}", flush=True)


class TestSet:
    """A task's first ``cap`` test rows, tokenized once."""

    def __init__(self, task_dir: Path, tokenizer, cap: int):
        rows = read_jsonl(task_dir / "test.jsonl")[:cap]
        self.labels = torch.tensor([r["label"] for r in rows])
        self.encoded = [
            tokenizer([r["text"] for r in rows[i : i + 64]], truncation=True, max_length=MAX_LENGTH,
                      padding=True, return_tensors="pt")
            for i in range(0, len(rows), 64)
        ]
        counts = torch.bincount(self.labels)
        self.majority = float(counts.max()) / len(rows)

    @torch.inference_mode()
    def accuracy(self, model) -> float:
        model.eval()
        predictions = torch.cat([model(**batch).logits.argmax(-1) for batch in self.encoded])
        return float((predictions == self.labels).float().mean())


def calibrate_all(models: Dict[str, Path], task_dirs: Dict[str, Path], work: Path) -> Dict[str, Dict[str, str]]:
    """Mask Fisher at 128/512 samples with both estimators, and full Fisher at 128/512, from training data."""
    paths: Dict[str, Dict[str, str]] = {task: {} for task in models}
    timings = {}
    for task, model in models.items():
        data = str(task_dirs[task] / "train.jsonl")
        # The label-free expected Fisher only at the larger size: it costs one backward pass per class.
        for samples, estimator in [*itertools.product(SAMPLES, ESTIMATORS), (max(SAMPLES), "expected")]:
            key = f"mask-{samples}-{estimator}"
            out = work / "fisher" / task / f"{key}.safetensors"
            if not out.exists():
                start = time.time()
                mfm.calibrate(str(model), data, out, mfm.CalibrationSettings(
                    samples=samples, batch_size=32, max_length=MAX_LENGTH, estimator=estimator))
                timings[f"{task}/{key}"] = time.time() - start
            paths[task][key] = str(out)
        for samples in SAMPLES:
            key = f"full-{samples}"
            out = work / "fisher" / task / key
            if not (out / "fisher.safetensors.index.json").exists():
                start = time.time()
                mfm.calibrate_full(str(model), data, out, mfm.CalibrationSettings(
                    samples=samples, batch_size=32, max_length=MAX_LENGTH, chunk_size=8))
                timings[f"{task}/{key}"] = time.time() - start
            paths[task][key] = str(out)
    if timings:  # add to the timings of earlier runs (cached files are not re-timed)
        log_file = work / "calibration_timings.json"
        earlier = json.loads(log_file.read_text()) if log_file.exists() else {}
        log_file.write_text(json.dumps({**earlier, **timings}, indent=2))
    return paths


def body(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("classifier.")}


def merge(method: Method, tasks: List[str], bodies, base_body, fishers) -> Dict[str, torch.Tensor]:
    """Merge the task models' bodies in memory with the registered mergekit method (same kernels as the CLI)."""
    parameters = dict(method.parameters)
    inputs = {task: bodies[task] for task in tasks}
    if method.fisher:
        parameters["fisher"] = {task: fishers[task][method.fisher] for task in tasks}
    base = None
    if method.uses_base:
        inputs = {"base": base_body, **inputs}
        base = "base"
    with torch.no_grad():
        return merge_state_dicts(inputs, merge_methods.get(method.method), parameters=parameters, base=base)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    parser.add_argument("--test-cap", type=int, default=300, help="test examples per task used for every score")
    parser.add_argument("--tasks", nargs="+", default=list(assets.TASKS), choices=assets.TASKS)
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    work = cache / "paper_protocol"
    started = time.time()

    log("assets")
    assets.fetch_minilm(cache)
    task_dirs = {task: assets.build_task(cache, task) for task in args.tasks}

    log("fine-tuning")
    # The merge grid's seed-0 fine-tunes: the same recipe (examples/finetune_classifier.py defaults, seed 0).
    models = {task: work / "models" / "seed0" / task for task in args.tasks}
    finetune_reports = {task: finetune(assets.minilm_path(cache), task_dirs[task], models[task])
                        for task in args.tasks}

    report = run_protocol(models, task_dirs, assets.minilm_path(cache), work, RESULTS, args.test_cap,
                          finetune_reports, started)
    print(markdown(report))
    return 0


def run_protocol(models: Dict[str, Path], task_dirs: Dict[str, Path], start_model: Path, work: Path, results: Path,
                 test_cap: int, finetune_reports: Dict[str, dict], started: float) -> dict:
    """Calibrate, merge every pair and all tasks with every method, score, and write the reports."""
    tasks = list(models)
    task_info = {task: json.loads((d / "info.json").read_text()) for task, d in task_dirs.items()}
    log("calibration")
    fishers = calibrate_all(models, task_dirs, work)

    log("loading models and test sets")
    tokenizer = AutoTokenizer.from_pretrained(models[tasks[0]])
    tests = {task: TestSet(task_dirs[task], tokenizer, test_cap) for task in tasks}
    task_models = {task: AutoModelForSequenceClassification.from_pretrained(models[task]) for task in tasks}
    # Clones: a state_dict aliases the live parameters, which each evaluation below overwrites.
    bodies = {task: {k: v.clone() for k, v in body(m.state_dict()).items()} for task, m in task_models.items()}
    start = load_file(str(start_model / "model.safetensors"))
    base_body = {("bert." + k if not k.startswith("bert.") else k): v for k, v in start.items()}
    base_body = {k: base_body[k] for k in bodies[tasks[0]]}
    individual = {task: tests[task].accuracy(task_models[task]) for task in tasks}
    log(f"individual accuracy on the first {test_cap} test rows: {individual}")

    combos = [list(c) for c in itertools.combinations(tasks, 2)] + ([tasks] if len(tasks) > 2 else [])
    cells = work / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    jobs = [(m, c) for m in METHODS for c in combos]
    for method, combo in tqdm(jobs, desc="merge + evaluate", unit="merge"):
        cell = cells / f"{method.name}|{'+'.join(combo)}.json".replace("/", "_").replace(" ", "_")
        if cell.exists():
            continue
        begin = time.time()
        merged = merge(method, combo, bodies, base_body, fishers)
        merge_seconds = time.time() - begin
        scores = score(merged, combo, task_models, bodies, tests)
        cell.write_text(json.dumps({"method": method.name, "combo": combo, "accuracy": scores,
                                    "merge_seconds": merge_seconds}))

    report = summarize(cells, individual, tests, test_cap, task_info, finetune_reports, started)
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(report, indent=2))
    (results / "results.md").write_text(markdown(report))
    plot(report, results / "normalized_accuracy.png")
    heatmaps(fishers, tasks, results / "heatmaps.png")
    log(f"done in {time.time() - started:.0f} s; see {results}")
    return report


def score(merged, combo, task_models, bodies, tests) -> Dict[str, float]:
    """Accuracy of the merged body under each task's own head; each task model is restored afterwards."""
    scores = {}
    for task in combo:
        model = task_models[task]
        model.load_state_dict(merged, strict=False)
        scores[task] = tests[task].accuracy(model)
        model.load_state_dict(bodies[task], strict=False)  # bodies are clones, not views of these parameters
    return scores


def summarize(cells, individual, tests, test_cap, task_info, finetune_reports, started) -> dict:
    rows = [json.loads(p.read_text()) for p in sorted(cells.glob("*.json"))]
    methods = {}
    for method in METHODS:
        entries = [r for r in rows if r["method"] == method.name]
        per_combo = {}
        for entry in entries:
            normalized = [entry["accuracy"][t] / individual[t] for t in entry["combo"]]
            corrected = [
                (entry["accuracy"][t] - tests[t].majority) / (individual[t] - tests[t].majority) for t in entry["combo"]
            ]
            per_combo["+".join(entry["combo"])] = {
                "accuracy": entry["accuracy"],
                "normalized": sum(normalized) / len(normalized),
                "chance_corrected": sum(corrected) / len(corrected),
                "merge_seconds": entry["merge_seconds"],
            }
        pairs = [v for k, v in per_combo.items() if k.count("+") == 1]
        methods[method.name] = {
            "per_combo": per_combo,
            "pairs_mean_normalized": sum(p["normalized"] for p in pairs) / max(len(pairs), 1),
            "pairs_min_normalized": min((p["normalized"] for p in pairs), default=float("nan")),
            "pairs_max_normalized": max((p["normalized"] for p in pairs), default=float("nan")),
            "pairs_mean_chance_corrected": sum(p["chance_corrected"] for p in pairs) / max(len(pairs), 1),
        }
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only",
        "command": "python examples/paper_protocol/run.py " + " ".join(sys.argv[1:]),
        "wall_seconds_this_run": round(time.time() - started),
        "test_cap": test_cap,
        "tasks": {t: {"train_size": task_info[t]["train"]["size"], "test_size": task_info[t]["test"]["size"],
                      "test_majority_rate_full": task_info[t]["test"]["majority_rate"],
                      "labels": task_info[t]["label_names"],
                      "individual_accuracy_capped": individual[t],
                      "majority_rate_capped": tests[t].majority,
                      "individual_accuracy_full_test": finetune_reports[t]["test_accuracy"],
                      "finetune_seconds": finetune_reports[t]["train_seconds"]} for t in individual},
        "methods": methods,
    }


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}. Scores on the first {report['test_cap']} test rows of each task.", "",
             "| task | labels | train | test | majority (scored rows) | individual accuracy (scored rows) |",
             "|---|---|---|---|---|---|"]
    for task, info in report["tasks"].items():
        lines.append(f"| {task} | {', '.join(info['labels'])} | {info['train_size']} | {info['test_size']} | "
                     f"{info['majority_rate_capped']:.3f} | {info['individual_accuracy_capped']:.3f} |")
    combos = list(next(iter(report["methods"].values()))["per_combo"])
    lines += ["", "Mean normalized accuracy (merged / individual) per combination; the last columns summarise the "
              "pairs (mean, min, max) and give the pairs' mean chance-corrected score "
              "(merged - majority) / (individual - majority).", "",
              "| method | " + " | ".join(combos) + " | pairs mean | pairs min | pairs max | pairs chance-corr. |",
              "|---|" + "---|" * (len(combos) + 4)]
    for name, entry in report["methods"].items():
        cells = [f"{entry['per_combo'][c]['normalized']:.3f}" if c in entry["per_combo"] else "-" for c in combos]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{entry['pairs_mean_normalized']:.3f}** | "
                     f"{entry['pairs_min_normalized']:.3f} | {entry['pairs_max_normalized']:.3f} | "
                     f"{entry['pairs_mean_chance_corrected']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5), layout="constrained")
    for row, name in enumerate(names):
        entry = report["methods"][name]
        pairs = [v["normalized"] for k, v in entry["per_combo"].items() if k.count("+") == 1]
        every = [v["normalized"] for k, v in entry["per_combo"].items() if k.count("+") > 1]
        axis.scatter(pairs, [row] * len(pairs), color="grey", s=12, alpha=0.7)
        axis.scatter(every, [row] * len(every), marker="x", color="tab:red", s=30)
        axis.scatter([entry["pairs_mean_normalized"]], [row], color="tab:blue", s=45)
    axis.set_yticks(range(len(names)), names)
    axis.invert_yaxis()
    axis.axvline(report["methods"]["linear"]["pairs_mean_normalized"], color="tab:blue", linestyle=":", lw=1)
    axis.set_xlabel("normalized accuracy (merged / individual)\n"
                    "blue: mean over pairs, grey: each pair, red x: all tasks at once, dotted: linear")
    figure.savefig(out, dpi=110)
    plt.close(figure)


def heatmaps(fishers, tasks, out: Path) -> None:
    from mergekit_fisher_mask.inspection import plot_mask_fishers

    files = [mfm.load_mask_fisher(fishers[t][f"mask-{max(SAMPLES)}-empirical"]) for t in tasks]
    plot_mask_fishers(files, tasks, out)


if __name__ == "__main__":
    sys.exit(main())
