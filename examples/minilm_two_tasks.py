"""Real, offline end to end: two MiniLM classifiers -> mask Fisher -> `fisher_mask` merge from YAML -> evaluation.

    python examples/minilm_two_tasks.py [--cache examples/.cache] [--tasks rotten_tomatoes spam]

Steps, each skipped when its output exists: fetch MiniLM and the task data (examples/assets.py), fine-tune one
classifier per task (examples/finetune_classifier.py), `mergekit-fisher calibrate` each on its own training split,
`mergekit-fisher merge` a `fisher_mask` recipe and a `linear` recipe, load both merges with `from_pretrained`, and
score the merged body with each task's own head on that task's test split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import assets  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from finetune_classifier import evaluate, finetune  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def with_head(merged_dir: Path, task_model: Path):
    """The merged body with ``task_model``'s own classifier head (heads of different tasks are not comparable)."""
    model = AutoModelForSequenceClassification.from_pretrained(task_model)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    body = {k: v for k, v in merged.state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    parser.add_argument("--tasks", nargs=2, default=["rotten_tomatoes", "spam"], choices=assets.TASKS)
    parser.add_argument("--samples", type=int, default=256, help="calibration examples per model")
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    work = cache / "minilm_two_tasks"
    start = time.time()

    assets.fetch_minilm(cache)
    models = {}
    for task in args.tasks:
        task_dir = assets.build_task(cache, task)
        models[task] = work / "models" / task
        finetune(assets.minilm_path(cache), task_dir, models[task])

    for task, model in models.items():
        fisher = work / f"{task}.fisher.safetensors"
        if not fisher.exists():
            run("mergekit-fisher", "calibrate", str(model), "--data", str(assets.task_dir(cache, task) / "train.jsonl"),
                "--out", str(fisher), "--samples", str(args.samples), "--batch-size", "32", "--max-length", "64")
        run("mergekit-fisher", "inspect", str(fisher), "--top-k", "5")

    first = str(models[args.tasks[0]])
    recipes = {
        "fisher_mask": {
            "merge_method": "fisher_mask",
            "base_model": first,
            "models": [{"model": str(m), "parameters": {"fisher": str(work / f"{t}.fisher.safetensors")}}
                       for t, m in models.items()],
            "parameters": {"scheme": "nodes", "normalize": "layer"},
            "dtype": "float32",
        },
        "linear": {"merge_method": "linear", "base_model": first, "dtype": "float32",
                   "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models.values()]},
    }
    results = {"individual": {t: evaluate(m, assets.task_dir(cache, t)) for t, m in models.items()}}
    for method, recipe in recipes.items():
        recipe_path = work / f"{method}.yml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = work / f"merged-{method}"
        run("mergekit-fisher", "merge", str(recipe_path), str(out), "--overwrite", "--heads", "base")
        with torch.inference_mode():
            results[method] = {t: evaluate(with_head(out, m), assets.task_dir(cache, t)) for t, m in models.items()}

    print("\ntest accuracy (merged body + each task's own head)")
    print(f"{'':14}" + "".join(f"{t:>18}" for t in args.tasks) + f"{'mean normalized':>18}")
    for name, accuracy in results.items():
        normalized = sum(accuracy[t] / results["individual"][t] for t in args.tasks) / len(args.tasks)
        print(f"{name:14}" + "".join(f"{accuracy[t]:>18.4f}" for t in args.tasks) + f"{normalized:>18.4f}")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\ndone in {time.time() - start:.0f} s; merged models in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
