"""Which merge to choose: every pair of four real MiniLM tasks, three fine-tuning seeds, all test rows, every method.

    python examples/merge_grid/run.py [--cache examples/.cache] [--seeds 0 1 2] [--ablation-seeds 0 1 2]
        [--methods NAME ...] [--name results]
    python examples/merge_grid/run.py --combine two_seeds seed2 --name three_seeds

For each seed, one MiniLM classifier per task is fine-tuned (``examples/finetune_classifier.py``; seed s changes the
training subset, the head's initialisation and the batch order), calibrated on its own training split, and every
pair of tasks is merged with each method of :data:`METHODS` (through the registered mergekit methods, as the CLI
runs them). The merged body is scored with each task's own head on that task's whole test split.

Reported: mean normalized accuracy (merged / individual) over the pairs, per seed and its mean; the paired
per-seed difference against ``linear`` and ``ties`` with its standard error over seeds; the worst pair against
``linear``; and a per-group ablation that swaps one tensor group (embeddings, attention, FFN, norms and biases) of
the default ``fisher_mask`` merge for the ``ties`` (and ``linear``) merge's. Every merge result is cached as one
JSON file under ``<cache>/merge_grid/cells``, so a re-run only computes what is missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
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
from mergekit_fisher_mask.architectures import Kind, Role, get_architecture  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 64
SAMPLES = 512


@dataclass(frozen=True)
class Method:
    """One merge configuration: a mergekit method, its parameters, the statistic file it reads per model (the
    recipe parameter and the calibration key), whether it needs the base, and whether it is data-free."""

    name: str
    method: str
    parameters: Dict = field(default_factory=dict)
    statistic: str = ""  # "" (none), or a key of CALIBRATIONS
    uses_base: bool = False

    @property
    def data_free(self) -> bool:
        return not self.statistic


# Calibrations, all on 512 training examples of the model's own task: key -> (record type, settings). The recipe
# parameter each merge method reads comes from the plugin's method table (fisher, gram).
CALIBRATIONS = {"mask": (mfm.MaskFisher, {}), "full": (mfm.FullFisher, {"chunk_size": 8}), "gram": (mfm.GramStats, {})}
DEFAULT = {}  # the plugin's defaults
METHODS: List[Method] = [
    Method("linear", "linear", {"weight": 1.0}),
    *[Method(f"task_arithmetic (lambda {lam})", "task_arithmetic", {"weight": lam}, uses_base=True)
      for lam in (0.5, 0.7, 1.0)],
    *[Method(f"ties (density {d})", "ties", {"weight": 1.0, "density": d}, uses_base=True) for d in (0.3, 0.5, 0.7)],
    *[Method(f"dare_ties (density {d})", "dare_ties", {"weight": 1.0, "density": d}, uses_base=True)
      for d in (0.3, 0.5, 0.7)],
    Method("fisher (full, raw)", "fisher", {"normalize": False}, "full"),
    Method("fisher_mask (default)", "fisher_mask", DEFAULT, "mask"),
    Method("fisher_mask, sparsify magnitude 0.5", "fisher_mask", {"sparsify": "magnitude", "density": 0.5}, "mask",
           uses_base=True),
    *[Method(f"regmean (alpha {a})", "regmean", {"alpha": a}, "gram") for a in (0.5, 0.9, 1.0)],
    # Candidates for a merge that beats every tuned data-free row (issue: directions worth measuring).
    Method("fisher_mask, sparsify magnitude 0.3", "fisher_mask", {"sparsify": "magnitude", "density": 0.3}, "mask",
           uses_base=True),
    Method("fisher_mask, task vectors, scale 1.4", "fisher_mask",
           {"sparsify": "magnitude", "density": 1.0, "consensus": False, "scale": 1.4}, "mask", uses_base=True),
    Method("fisher_mask, soft magnitude p=1, scale 1.4", "fisher_mask",
           {"sparsify": "magnitude", "density": 1.0, "consensus": False, "magnitude_power": 1.0, "scale": 1.4},
           "mask", uses_base=True),
    *[Method(f"regmean (alpha 0.9), scale {s}", "regmean", {"alpha": 0.9, "scale": s}, "gram", uses_base=True)
      for s in (1.2, 1.4)],
]
ABLATION_GROUPS = ("embeddings", "attention", "ffn", "norms and biases")


def log(message: str) -> None:
    print(f"[merge_grid {time.strftime('%H:%M:%S')}] {message}", flush=True)


class TestSet:
    """A task's whole test split, tokenized once, in length-sorted batches (less padding, same accuracy)."""

    def __init__(self, task_dir: Path, tokenizer):
        rows = read_jsonl(task_dir / "test.jsonl")
        encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)
        order = sorted(range(len(rows)), key=lambda i: len(encoded["input_ids"][i]))
        self.labels = torch.tensor([rows[i]["label"] for i in order])
        self.batches = [
            tokenizer.pad({k: [encoded[k][i] for i in order[s : s + 128]] for k in encoded}, return_tensors="pt")
            for s in range(0, len(order), 128)
        ]
        self.majority = float(torch.bincount(self.labels).max()) / len(rows)

    @torch.inference_mode()
    def accuracy(self, model) -> float:
        model.eval()
        predictions = torch.cat([model(**batch).logits.argmax(-1) for batch in self.batches])
        return float((predictions == self.labels).float().mean())


def tensor_group(spec, name: str) -> str:
    """Which ablation group a body tensor belongs to, from the architecture table's roles."""
    _, _, rule = spec.locate(name)
    if rule is None or rule.role == Role.EMBEDDING:
        return "embeddings"
    if name.endswith(".bias") or rule.role in (Role.ATTN_NORM, Role.FFN_NORM, Role.O_BIAS, Role.DOWN_BIAS):
        return "norms and biases"
    return "attention" if rule.role.kind == Kind.HEADS else "ffn"


class Seed:
    """One seed's fine-tuned models, Fisher files, bodies and scorers."""

    def __init__(self, cache: Path, work: Path, seed: int, tasks: List[str], tests: Dict[str, TestSet]):
        self.seed, self.tasks, self.tests = seed, tasks, tests
        task_dirs = {task: assets.task_dir(cache, task) for task in tasks}
        self.paths = {task: work / "models" / f"seed{seed}" / task for task in tasks}
        self.finetune = {task: finetune(assets.minilm_path(cache), task_dirs[task], self.paths[task], seed=seed)
                         for task in tasks}
        self.fishers = {task: self._calibrate(task, task_dirs[task], work) for task in tasks}
        self.models = {task: AutoModelForSequenceClassification.from_pretrained(self.paths[task]) for task in tasks}
        self.bodies = {task: {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("classifier.")}
                       for task, m in self.models.items()}
        self.individual = {task: tests[task].accuracy(self.models[task]) for task in tasks}

    def _calibrate(self, task: str, task_dir: Path, work: Path) -> Dict[str, str]:
        """Every statistic of CALIBRATIONS for one task model (cached; the file names are the keys)."""
        from mergekit_fisher_mask.calibration import measure_statistic

        data = str(task_dir / "train.jsonl")
        folder = work / "fisher" / f"seed{self.seed}" / task
        paths = {}
        for key, (record, options) in CALIBRATIONS.items():
            out = folder / (key if record.OUTPUT.folder else f"{key}.safetensors")
            if not record.OUTPUT.is_ours(out):
                settings = mfm.CalibrationSettings(samples=SAMPLES, batch_size=32, max_length=MAX_LENGTH, **options)
                measure_statistic(record, str(self.paths[task]), data, out, settings, overwrite=True, progress=False)
            paths[key] = str(out)
        return paths

    def merge(self, method: Method, pair, base_body) -> Dict[str, torch.Tensor]:
        parameters = dict(method.parameters)
        inputs = {task: self.bodies[task] for task in pair}
        if method.statistic:
            parameter = mfm.PLUGIN_METHODS[method.method].parameter
            parameters[parameter] = {task: self.fishers[task][method.statistic] for task in pair}
        base = None
        if method.uses_base:
            inputs = {"base": base_body, **inputs}
            base = "base"
            if method.statistic:
                parameters[parameter]["base"] = None  # the base is the task vectors' origin, not a merged model
        torch.manual_seed(0)  # DARE's random masks: the same draw for every run of a cell
        with torch.no_grad():
            return merge_state_dicts(inputs, merge_methods.get(method.method), parameters=parameters, base=base)

    def score(self, merged, pair) -> Dict[str, float]:
        """Accuracy of the merged body under each task's own head; each task model is restored afterwards."""
        scores = {}
        for task in pair:
            model = self.models[task]
            model.load_state_dict(merged, strict=False)
            scores[task] = self.tests[task].accuracy(model)
            model.load_state_dict(self.bodies[task], strict=False)
        return scores

    def normalized(self, scores: Dict[str, float]) -> float:
        return statistics.mean(scores[t] / self.individual[t] for t in scores)


def cell_path(cells: Path, seed: int, name: str, pair) -> Path:
    return cells / f"seed{seed}|{name}|{'+'.join(pair)}.json".replace("/", "_").replace(" ", "_")


def mean_se(values: List[float]):
    mean = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def aggregate(rows: List[dict], seeds: List[int]) -> Dict[str, dict]:
    """Per method with a cell for every seed: its mean over pairs per seed, and its mean over seeds per pair."""
    by = {}
    for row in rows:
        by.setdefault(row["method"], {}).setdefault(row["seed"], {})["+".join(row["pair"])] = row["normalized"]
    return {name: {"per_seed_mean": {str(s): statistics.mean(per_seed[s].values()) for s in seeds},  # JSON's keys
                   "per_pair": {p: statistics.mean(per_seed[s][p] for s in seeds) for p in per_seed[seeds[0]]}}
            for name, per_seed in by.items() if set(per_seed) == set(seeds)}


def combine(reports: List[dict]) -> Dict[str, dict]:
    """The aggregates of reports on disjoint seeds as one: per-seed means side by side, per-pair means weighted by
    each report's seed count (a mean over all the seeds, since every report averages the same pairs)."""
    seeds = [s for r in reports for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--combine: the reports share seeds ({seeds}); give reports of disjoint seeds")
    names = [n for n in reports[0]["methods"] if all(n in r["methods"] for r in reports)]
    out = {}
    for name in names:
        entries = [(r["methods"][name], len(r["seeds"])) for r in reports]
        out[name] = {"per_seed_mean": {s: v for e, _ in entries for s, v in e["per_seed_mean"].items()},
                     "per_pair": {p: sum(e["per_pair"][p] * n for e, n in entries) / len(seeds)
                                  for p in entries[0][0]["per_pair"]}}
    return out


def summarize(methods: Dict[str, dict], seeds: List[int], individual: Dict, started: float) -> dict:
    """Means, and paired per-seed differences against ``linear`` and the best data-free row (with the worst pair)."""
    seeds = [str(s) for s in seeds]  # per_seed_mean is keyed as JSON writes it, in a run and in a combined report
    methods = {n: dict(e) for n, e in methods.items()}
    for entry in methods.values():
        entry["mean"] = statistics.mean(entry["per_seed_mean"][s] for s in seeds)
    data_free = [m.name for m in METHODS if m.data_free and m.name in methods]
    best_free = max(data_free, key=lambda n: methods[n]["mean"], default=None)
    for entry in methods.values():
        for reference in ("linear", best_free):
            if reference in methods:
                ref = methods[reference]
                diffs = [entry["per_seed_mean"][s] - ref["per_seed_mean"][s] for s in seeds]
                entry[f"vs {reference}"] = {"mean": mean_se(diffs)[0], "se": mean_se(diffs)[1],
                                            "worst_pair": min(v - ref["per_pair"][p]
                                                              for p, v in entry["per_pair"].items())}
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only",
        "command": "python examples/merge_grid/run.py " + " ".join(sys.argv[1:]),
        "seeds": [int(s) for s in seeds],
        "best_data_free": best_free,
        "individual_accuracy": individual,
        "methods": methods,
        "wall_seconds_this_run": round(time.time() - started),
    }


def difference(paired: dict) -> str:
    """``+0.0123 +- 0.0045`` (mean and standard error over seeds); one seed has no standard error."""
    se = paired.get("se", 0.0)
    return f"{paired.get('mean', 0):+.4f}" + ("" if math.isnan(se) else f" +- {se:.4f}")


def markdown(report: dict, ablation: dict) -> str:
    seeds, best = report["seeds"], report["best_data_free"]
    lines = [f"Command: `{report['command']}`; machine: {report['machine']}.", "",
             "Mean normalized accuracy (merged / individual) over the 6 task pairs, whole test splits; differences "
             "are paired per seed (mean over seeds +- standard error); worst pair = the pair (mean over seeds) where "
             f"the method does worst against the reference. Best tuned data-free row: {best} (tuned on these same "
             "test sets, as a user tuning its knobs would).", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs linear | vs best data-free | "
             "worst pair vs linear |", "|---|" + "---|" * (len(seeds) + 4)]
    for name, entry in sorted(report["methods"].items(), key=lambda kv: -kv[1]["mean"]):
        cells = [f"{entry['per_seed_mean'][str(s)]:.4f}" for s in seeds]
        vs_linear, vs_best = entry.get("vs linear", {}), entry.get(f"vs {best}", {})
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | **{entry['mean']:.4f}** | {difference(vs_linear)} | "
            f"{difference(vs_best)} | {vs_linear.get('worst_pair', 0):+.4f} |"
        )
    if ablation:
        lines += ["", "Per-group ablation of the default fisher_mask merge: one tensor group taken from another merge "
                  "(mean normalized accuracy over pairs and the ablation seeds; change against fisher_mask default).",
                  "", "| group swapped | donor | mean | change |", "|---|---|---|---|"]
        for key, value in ablation.items():
            lines.append(f"| {value['group']} | {value['donor']} | {value['mean']:.4f} | {value['change']:+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--methods", nargs="+", default=None, help="only these rows (default: every row)")
    parser.add_argument("--tasks", nargs="+", default=list(assets.TASKS), choices=assets.TASKS)
    parser.add_argument("--name", default="results", help="results file stem: results/<name>.{json,md}")
    parser.add_argument("--combine", nargs="+", metavar="NAME", default=None,
                        help="merge no model: write results/<name>.* from results/<NAME>.json files of disjoint seeds "
                             "(the rows every one of them has)")
    args = parser.parse_args(argv)
    if args.combine:
        reports = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.combine]
        seeds = [s for r in reports for s in r["seeds"]]
        individual = {s: v for r in reports for s, v in r["individual_accuracy"].items()}
        report = summarize(combine(reports), seeds, individual, time.time())
        report["combined_from"] = [f"results/{n}.json" for n in args.combine]
        (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
        (RESULTS / f"{args.name}.md").write_text(markdown(report, {}))
        print(markdown(report, {}))
        return 0
    cache = args.cache.resolve()
    work = cache / "paper_protocol"  # fine-tuned models and Fisher files are shared with the paper protocol
    cells = cache / "merge_grid" / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    started = time.time()
    assets.fetch_minilm(cache)
    for task in args.tasks:
        assets.build_task(cache, task)
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path(cache))
    tests = {task: TestSet(assets.task_dir(cache, task), tokenizer) for task in args.tasks}
    start = load_file(str(assets.minilm_path(cache) / "model.safetensors"))
    start = {("bert." + k if not k.startswith("bert.") else k): v for k, v in start.items()}
    pairs = [list(p) for p in itertools.combinations(args.tasks, 2)]
    spec = get_architecture("bert")
    rows, individual, ablation_rows = [], {}, []
    for seed in args.seeds:
        log(f"seed {seed}: fine-tuning and calibration (cached)")
        run = Seed(cache, work, seed, args.tasks, tests)
        individual[seed] = run.individual
        base_body = {k: start[k] for k in run.bodies[args.tasks[0]]}
        chosen = [m for m in METHODS if args.methods is None or m.name in args.methods]
        jobs = [(m, p) for m in chosen for p in pairs]
        for method, pair in tqdm(jobs, desc=f"seed {seed}: merge + score", unit="merge"):
            path = cell_path(cells, seed, method.name, pair)
            if not path.exists():
                begin = time.time()
                merged = run.merge(method, pair, base_body)
                scores = run.score(merged, pair)
                path.write_text(json.dumps({"seed": seed, "method": method.name, "pair": pair, "accuracy": scores,
                                            "seconds": time.time() - begin}))
            row = json.loads(path.read_text())
            row["normalized"] = run.normalized(row["accuracy"])
            rows.append(row)
        if seed not in args.ablation_seeds:
            continue
        default = next(m for m in METHODS if m.name == "fisher_mask (default)")
        donors = [m for m in METHODS if m.name in ("ties (density 0.5)", "linear")]
        if not args.ablation_seeds:
            continue
        for pair in tqdm(pairs, desc=f"seed {seed}: ablation", unit="pair"):
            todo = [(g, d) for g in ABLATION_GROUPS for d in donors
                    if not cell_path(cells, seed, f"ablation {g} from {d.name}", pair).exists()]
            if todo:
                ours = run.merge(default, pair, base_body)
                merged_donors = {d.name: run.merge(d, pair, base_body) for d in donors}
                for group, donor in todo:
                    mixed = {k: merged_donors[donor.name][k] if tensor_group(spec, k) == group else v
                             for k, v in ours.items()}
                    scores = run.score(mixed, pair)
                    cell_path(cells, seed, f"ablation {group} from {donor.name}", pair).write_text(json.dumps(
                        {"seed": seed, "group": group, "donor": donor.name, "pair": pair, "accuracy": scores}))
            for group in ABLATION_GROUPS:
                for donor in donors:
                    row = json.loads(cell_path(cells, seed, f"ablation {group} from {donor.name}", pair).read_text())
                    row["normalized"] = run.normalized(row["accuracy"])
                    ablation_rows.append(row)
    report = summarize(aggregate(rows, args.seeds), args.seeds, individual, started)
    ablation = {}
    default_mean = statistics.mean(
        r["normalized"] for r in rows if r["method"] == "fisher_mask (default)" and r["seed"] in args.ablation_seeds
    ) if args.ablation_seeds else 0.0
    for group in ABLATION_GROUPS:
        for donor in ("ties (density 0.5)", "linear"):
            values = [r["normalized"] for r in ablation_rows if r["group"] == group and r["donor"] == donor]
            if values:
                ablation[f"{group} from {donor}"] = {"group": group, "donor": donor, "mean": statistics.mean(values),
                                                     "change": statistics.mean(values) - default_mean}
    report["ablation"] = ablation
    report["ablation_seeds"] = args.ablation_seeds
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(report, ablation))
    print(markdown(report, ablation))
    log(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
