"""An LLM merge benchmark that tells merge methods apart: fine-tunes of one base model on distinct text domains,
merged pair by pair and all at once, scored by the share of each fine-tune's gain that the merge keeps.

    nice -n 10 python examples/llm_domains/run.py --base smollm2 --seeds 0 1 --eval-blocks 16
    nice -n 10 python examples/llm_domains/run.py --base gemma3 --seeds 0 --eval-blocks 16
    nice -n 10 python examples/llm_domains/run.py --base smollm2 --pilot --seeds 0 --lr 2e-4 --eval-blocks 16

The defaults (40 steps of 8 x 128 tokens at peak lr 1e-4, linear decay) are the cheapest setting the pilot found
where ``linear`` keeps at most about 85% of the fine-tunes' gain (0.78 on SmolLM2, seed 0; 0.85 at 2e-4, and more
than all of it at 5e-4, where an average of two fine-tunes beats each of them on its own domain). Each process uses
``OMP_NUM_THREADS`` threads; two seeds run side by side as two processes of one thread.

* Base models: SmolLM2-135M-Instruct or Gemma-3-270M (base), converted from GGUFs that ship in PyPI packages
  (``examples/assets.py``).
* Domains (``assets.build_text``): ``austen`` (held out: Pride and Prejudice), ``code`` (the Python standard library,
  split by top-level module), ``email`` (SpamAssassin messages as raw RFC822 text, one in ten held out),
  ``reviews`` (Amazon Fine Foods, modeldata's split) and ``brown`` (the Brown corpus, split by file).
* Fine-tune: ``--steps`` steps of continued pre-training on ``--batch`` x 128-token windows of the domain's training
  text, AdamW at peak ``--lr`` with ``--schedule`` (default ``linear``: 10% warmup, then decay to 0). The seed picks
  the windows and their order. Checkpoints are kept per step count; a ``constant``-rate run resumes from the last
  one, so its step counts can be compared without retraining.
* Merges: every pair of domains and all of them, with every row of :data:`METHODS`. Data-aware rows read a per-model
  statistic (:class:`Statistic`) written by a public ``mergekit_fisher_mask`` calibrator on the model's own
  training text. Rows of one ``family`` differ by one knob; the report picks the family's best knob per base model
  (tuned on the same held-out text it reports, as a user tuning knobs would).
* Score: gain kept = (log ppl_base - log ppl_merged) / (log ppl_base - log ppl_finetune) on each merged domain's
  held-out text, averaged over the merged domains, then over the combinations; 1 = every domain as good as its own
  fine-tune, 0 = no better than the base model. Differences between methods are paired per seed.
* ``--pilot`` merges with ``linear`` only and appends linear's gain kept to ``results/pilot_<base>.{json,md}``.

Everything is cached under ``<cache>/llm_domains/<base>`` (fine-tunes, statistics, and one JSON file per merge
cell), so a re-run computes only what is missing. Results: ``examples/llm_domains/results/<base>.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))

import assets  # noqa: E402
import torch  # noqa: E402
from mergekit import merge_methods  # noqa: E402
from mergekit.merge_methods import merge_state_dicts  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import mergekit_fisher_mask as mfm  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 1 when two evidence jobs share 2 cores
BLOCK = 128
EVAL_SEED = 1234  # the held-out windows are the same for every seed and step count
DOMAINS = ("austen", "code", "email", "reviews", "brown")
BASES = {"smollm2": assets.fetch_smollm2, "gemma3": assets.fetch_gemma3}


@dataclass(frozen=True)
class Statistic:
    """A per-model statistic that a data-aware merge reads: ``fn(model, data, out, settings)`` of the public
    ``mergekit_fisher_mask`` API writes it to ``out`` (a file or a folder), and the merge gets the path as the
    per-model parameter ``parameter``."""

    parameter: str
    calibrator: str
    out: str


MASK = Statistic("fisher", "calibrate", "mask.safetensors")
FULL = Statistic("fisher", "calibrate_full", "full")
GRAM = Statistic("gram", "calibrate_gram", "gram")


@dataclass(frozen=True)
class Row:
    """One merge configuration. ``lambda: "1/K"`` is resolved to 1 / (models merged)."""

    name: str
    method: str
    parameters: Dict = field(default_factory=dict)
    statistic: Optional[Statistic] = None
    uses_base: bool = False  # the base model is passed as the task vectors' origin
    family: str = ""  # rows of one family differ by one knob; the report keeps the family's best row
    knob: str = ""


def knob_rows(family: str, method: str, knob: str, values, parameters: Dict) -> List[Row]:
    return [Row(f"{family} ({knob} {v})", method, {**parameters, knob: v}, uses_base=True, family=family,
                knob=f"{knob} {v}") for v in values]


DENSITIES = (0.3, 0.5, 0.7)
METHODS: List[Row] = [
    Row("linear", "linear", {"weight": 1.0}),
    Row("task_arithmetic (lambda 1/K)", "task_arithmetic", {"weight": 1.0, "lambda": "1/K"}, uses_base=True),
    *knob_rows("task_arithmetic", "task_arithmetic", "lambda", (0.5, 0.7, 1.0), {"weight": 1.0}),
    *knob_rows("ties", "ties", "density", DENSITIES, {"weight": 1.0}),
    # dare_ties with normalize: true, as ties has by default (its own default, false, adds the task vectors up)
    *knob_rows("dare_ties", "dare_ties", "density", DENSITIES, {"weight": 1.0, "normalize": True}),
    Row("fisher_mask (default)", "fisher_mask", {}, MASK),
    Row("fisher_mask (sparsify magnitude, density 0.5)", "fisher_mask", {"sparsify": "magnitude", "density": 0.5},
        MASK, uses_base=True),
    Row("fisher (full)", "fisher", {}, FULL),
    Row("fisher_mask (task vectors, scale 1.4)", "fisher_mask",
        {"sparsify": "magnitude", "density": 1.0, "consensus": False, "scale": 1.4}, MASK, uses_base=True),
    *[Row(f"regmean (alpha {a})", "regmean", {"alpha": a}, GRAM) for a in (0.5, 0.9)],
]
DATA_FREE = [row for row in METHODS if row.statistic is None]


def log(message: str) -> None:
    print(f"[llm_domains {time.strftime('%H:%M:%S')}] {message}", flush=True)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "+-._=" else "_" for c in text)


# ---------------------------------------------------------------------------------------------------------------
# data, fine-tuning, statistics
# ---------------------------------------------------------------------------------------------------------------


def windows(tokenizer, path: Path, count: int, seed: int) -> torch.Tensor:
    """``count`` BLOCK-token windows (count, BLOCK) of a text file's token stream in a seeded order: a shuffle of all
    windows, then another shuffle if more are needed. Asking for fewer gives a prefix of the same sequence."""
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"][0]
    starts: List[int] = []
    for epoch in itertools.count():
        if len(starts) >= count:
            break
        order = list(range(0, len(ids) - BLOCK, BLOCK))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        starts += order
    return torch.stack([ids[s : s + BLOCK] for s in starts[:count]])


def checkpoints(folder: Path) -> Dict[int, Path]:
    return {int(p.name[4:]): p for p in folder.glob("step*") if (p / "train.json").exists()}


def learning_rate(schedule: str, lr: float, step: int, steps: int) -> float:
    """``constant``: ``lr`` throughout. ``linear``: warm up over the first 10% of the steps, then decay linearly to
    0 at ``steps``, so the fine-tune ends at a settled point rather than where the last noisy steps left it."""
    if schedule == "constant":
        return lr
    warmup = max(1, steps // 10)
    return lr * min((step + 1) / warmup, (steps - step) / max(1, steps - warmup))


def finetune(base: Path, text: Path, folder: Path, steps: int, batch: int, lr: float, seed: int,
             schedule: str = "constant") -> Path:
    """``folder/step<steps>``: continued pre-training for ``steps`` steps (cached). A constant-rate run resumes
    from the longest shorter run that kept its optimizer state (only the latest checkpoint keeps it); a decaying
    schedule depends on ``steps``, so each step count is a run of its own."""
    done = checkpoints(folder)
    if steps in done:
        return done[steps]
    start = 0
    if schedule == "constant":
        start = max((s for s, p in done.items() if s < steps and (p / "optimizer.pt").exists()), default=0)
    source = done[start] if start else base
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history: List[float] = []
    if start:
        optimizer.load_state_dict(torch.load(source / "optimizer.pt"))
        history = json.loads((source / "train.json").read_text())["losses"]
    data = windows(tokenizer, text, steps * batch, seed)
    log(f"fine-tune {folder.parent.name}/{folder.name}: steps {start} -> {steps}")
    model.train()
    begin = time.time()
    for step in range(start, steps):
        inputs = data[step * batch : (step + 1) * batch]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, lr, step, steps)
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(round(loss.item(), 4))
    out = folder / f"step{steps}"
    tmp = folder / f".step{steps}.tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if schedule == "constant":  # only a constant-rate run can be continued
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    seconds = round(time.time() - begin, 1)
    (tmp / "train.json").write_text(json.dumps({
        "steps": steps, "batch": batch, "block": BLOCK, "lr": lr, "schedule": schedule, "seed": seed,
        "resumed_from": start,
        "seconds": seconds, "seconds_per_step": round(seconds / (steps - start), 2),
        "first_loss": history[0], "last_10_mean_loss": statistics.mean(history[-10:]), "losses": history}))
    tmp.rename(out)
    if start:
        (source / "optimizer.pt").unlink()
    return out


def statistic(stat: Statistic, model: Path, data: Path, folder: Path, settings) -> str:
    """The statistic of ``model`` on ``data`` (cached: a ``.done`` marker is written after the calibrator returns)."""
    out = folder / stat.out
    marker = folder / f"{stat.out}.done"
    if not marker.exists():
        log(f"{stat.calibrator} {folder.name}")
        function = getattr(mfm, stat.calibrator)
        accepted = inspect.signature(function).parameters  # a leftover of an interrupted run is replaced
        extra = {k: v for k, v in {"progress": False, "overwrite": True}.items() if k in accepted}
        begin = time.time()
        function(str(model), str(data), out, settings, **extra)
        marker.write_text(json.dumps({"seconds": round(time.time() - begin, 1)}))
    return str(out)


def floats(path: Path) -> Dict[str, torch.Tensor]:
    """The model's float tensors as its checkpoint holds them: a tied alias (``lm_head.weight`` of a model with tied
    embeddings) is left out, as ``save_pretrained`` leaves it out, so every method sees what mergekit would."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state, seen = {}, set()
    for name, value in model.state_dict().items():
        if value.is_floating_point() and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            state[name] = value.clone()
    return state


class Scorer:
    """Held-out perplexity of a state dict on each domain (tokenized once; one model object, reloaded per merge)."""

    def __init__(self, base: Path, text: Dict[str, Dict[str, Path]], count: int):
        tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.data = {d: windows(tokenizer, paths["test"], count, EVAL_SEED) for d, paths in text.items()}

    @torch.inference_mode()
    def perplexity(self, state: Dict[str, torch.Tensor], domain: str) -> float:
        self.model.load_state_dict(state, strict=False)
        data = self.data[domain]
        losses = [self.model(input_ids=data[i : i + 4], labels=data[i : i + 4]).loss for i in range(0, len(data), 4)]
        return math.exp(float(torch.stack(losses).mean()))


def cached(path: Path, compute) -> dict:
    """``compute()`` stored as JSON at ``path``, or what is already there."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(compute()))
        tmp.replace(path)
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------------------------


def merge(row: Row, combo: List[str], states, base_state, stats) -> Dict[str, torch.Tensor]:
    parameters = {k: (1.0 / len(combo) if v == "1/K" else v) for k, v in row.parameters.items()}
    inputs = {d: states[d] for d in combo}
    base = None
    if row.statistic:
        parameters[row.statistic.parameter] = {d: stats[d][row.statistic] for d in combo}
    if row.uses_base:
        inputs, base = {"base": base_state, **inputs}, "base"
        if row.statistic:
            parameters[row.statistic.parameter]["base"] = None  # the task vectors' origin, not a merged model
    torch.manual_seed(0)  # dare_ties drops entries at random
    with torch.no_grad():
        return merge_state_dicts(inputs, merge_methods.get(row.method), parameters=parameters, base=base)


def cell_name(combo: List[str], row: Row) -> str:
    """A readable file name with a hash of everything that defines the merge, so an edited row is recomputed."""
    definition = json.dumps([row.method, row.parameters, row.statistic and asdict(row.statistic), row.uses_base],
                            sort_keys=True, default=str)
    return slug(f"{'+'.join(combo)}|{row.name}") + f"-{hashlib.sha1(definition.encode()).hexdigest()[:8]}.json"


def combinations(domains: List[str]) -> List[List[str]]:
    return [list(c) for c in itertools.combinations(domains, 2)] + ([list(domains)] if len(domains) > 2 else [])


class SeedRun:
    """One seed of one setting: its fine-tunes, their statistics, and its merge cells."""

    def __init__(self, args, base: Path, text, scorer: Scorer, seed: int):
        self.args, self.base, self.text, self.scorer, self.seed = args, base, text, scorer, seed
        schedule = "" if args.schedule == "constant" else f"-{args.schedule}"  # constant runs keep their old folder
        self.root = args.work / f"lr{args.lr:g}-batch{args.batch}{schedule}" / f"seed{seed}"
        self.cells = self.root / "cells" / f"step{args.steps}-eval{args.eval_blocks}"
        self.models = {d: finetune(base, text[d]["train"], self.root / "finetune" / d, args.steps, args.batch,
                                   args.lr, seed, args.schedule) for d in args.domains}
        self.training = {d: json.loads((self.models[d] / "train.json").read_text()) for d in args.domains}
        self._states = None

    def stats(self, rows: List[Row]) -> Dict[str, Dict[Statistic, str]]:
        settings = mfm.CalibrationSettings(samples=self.args.samples, batch_size=8, max_length=BLOCK, seed=self.seed)
        needed = {row.statistic for row in rows if row.statistic}
        return {d: {s: statistic(s, self.models[d], self.text[d]["train"], self.root / "stats" /
                                 f"{d}-step{self.args.steps}-n{self.args.samples}", settings) for s in needed}
                for d in self.args.domains}

    def states(self):
        if self._states is None:
            self._states = {d: floats(self.models[d]) for d in self.args.domains}
        return self._states

    def individual(self) -> Dict[str, Dict[str, float]]:
        """Perplexity of each fine-tune on every domain."""
        out = {}
        for d in self.args.domains:
            out[d] = cached(self.cells / slug(f"finetune-{d}.json"),
                            lambda: {e: self.scorer.perplexity(self.states()[d], e) for e in self.args.domains})
        return out

    def run_cells(self, rows: List[Row], base_state_fn) -> Dict[str, Dict[str, dict]]:
        """{combination: {row name: cell}} for every combination and row, computing the missing cells."""
        combos = combinations(self.args.domains)
        missing = [(c, r) for c in combos for r in rows if not (self.cells / cell_name(c, r)).exists()]
        stats = self.stats([r for _, r in missing]) if missing else {}
        for index, (combo, row) in enumerate(missing):
            def compute():
                log(f"seed {self.seed} [{index + 1}/{len(missing)}] {'+'.join(combo)}: {row.name}")
                begin = time.time()
                merged = merge(row, combo, self.states(), base_state_fn(), stats)
                merge_seconds = time.time() - begin
                return {"perplexity": {d: self.scorer.perplexity(merged, d) for d in combo},
                        "merge_seconds": round(merge_seconds, 1), "seconds": round(time.time() - begin, 1)}
            cached(self.cells / cell_name(combo, row), compute)
        return {"+".join(c): {r.name: json.loads((self.cells / cell_name(c, r)).read_text()) for r in rows}
                for c in combos}


# ---------------------------------------------------------------------------------------------------------------
# scores and report
# ---------------------------------------------------------------------------------------------------------------


def gain_kept(ppl_base: float, ppl_finetune: float, ppl_merged: float) -> float:
    return (math.log(ppl_base) - math.log(ppl_merged)) / (math.log(ppl_base) - math.log(ppl_finetune))


def score_seed(cells, individual, base_ppl) -> Dict[str, Dict[str, float]]:
    """{row name: {combination: gain kept averaged over the combination's domains}}."""
    out: Dict[str, Dict[str, float]] = {}
    for combo, by_row in cells.items():
        for name, cell in by_row.items():
            out.setdefault(name, {})[combo] = statistics.mean(
                gain_kept(base_ppl[d], individual[d][d], cell["perplexity"][d]) for d in combo.split("+"))
    return out


def mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else float("nan")}


def summarize(per_seed: Dict[int, Dict[str, Dict[str, float]]], rows: List[Row]) -> dict:
    """Per row: mean gain kept per seed and overall, per combination; the tuned families' choices; paired
    differences against linear and against the best tuned data-free row."""
    seeds = sorted(per_seed)
    combos = list(next(iter(per_seed.values()))["linear"])
    methods = {}
    for row in rows:
        seed_means = {s: statistics.mean(per_seed[s][row.name].values()) for s in seeds}
        methods[row.name] = {
            "family": row.family, "knob": row.knob, "data_aware": row.statistic is not None,
            "per_seed": seed_means, "mean": statistics.mean(seed_means.values()),
            "per_combination": {c: statistics.mean(per_seed[s][row.name][c] for s in seeds) for c in combos}}
    tuned = {}
    for family in dict.fromkeys(r.family for r in rows if r.family):
        best = max((r for r in rows if r.family == family), key=lambda r: methods[r.name]["mean"])
        tuned[family] = best.name
    data_free = [r.name for r in rows if r.statistic is None and (not r.family or tuned[r.family] == r.name)]
    best_data_free = max(data_free, key=lambda n: methods[n]["mean"])
    for name, entry in methods.items():
        for reference in ("linear", best_data_free):
            diffs = [entry["per_seed"][s] - methods[reference]["per_seed"][s] for s in seeds]
            combo_diffs = {c: statistics.mean(per_seed[s][name][c] - per_seed[s][reference][c] for s in seeds)
                           for c in combos}
            entry[f"vs {reference}"] = {**mean_std(diffs), "per_seed": diffs, "per_combination": combo_diffs}
    return {"seeds": seeds, "combinations": combos, "methods": methods, "tuned": tuned,
            "best_data_free": best_data_free}


def headline_rows(summary: dict) -> List[str]:
    """The reported rows: untuned rows, and each family's tuned row."""
    return [n for n, e in summary["methods"].items() if not e["family"] or summary["tuned"][e["family"]] == n]


def label(summary: dict, name: str) -> str:
    entry = summary["methods"][name]
    return f"{entry['family']}, tuned: {entry['knob']}" if entry["family"] else name


def fmt(entry: dict) -> str:
    std = "" if math.isnan(entry["std"]) else f" ± {entry['std']:.3f}"
    return f"{entry['mean']:+.3f}{std}"


def markdown(report: dict) -> str:
    summary, domains, seeds = report["summary"], report["domains"], report["summary"]["seeds"]
    combos, best = summary["combinations"], summary["best_data_free"]
    t = report["training"]
    lines = [f"# {report['base']}: merges of {', '.join(domains)} fine-tunes", "",
             f"Fine-tunes: {t['steps']} steps of continued pre-training, {t['batch']} x {BLOCK} tokens, AdamW lr "
             f"{t['lr']:g} ({t.get('schedule', 'constant')} schedule); seeds {', '.join(map(str, seeds))} (the seed picks the training windows and their "
             f"order). Held-out perplexity on {report['eval_tokens_per_domain']} tokens per domain. Statistics: "
             f"{report['calibration_samples']} training examples of {BLOCK} tokens per model.", "",
             "**Gain kept** = (log ppl_base - log ppl_merged) / (log ppl_base - log ppl_finetune) on each merged "
             "domain, averaged over the combination's domains, then over the combinations (all pairs and all at "
             "once) and the seeds. Higher is better; 1 = each domain as good as its own fine-tune.", "",
             "## Base model and fine-tunes (held-out perplexity, mean over seeds)", "",
             "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, row in report["individual_mean"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[d]:.2f}" for d in domains) + " |")
    lines += ["", "## Gain kept per method", "",
              "Tuned rows keep the family's best knob for this base model, chosen on the same held-out text as "
              "reported (what a user tuning knobs would do); the whole grid is below. Paired differences: the "
              "per-seed difference of mean gain kept, mean ± std over seeds.", "",
              "| method | mean gain kept | " + " | ".join(combos) + " | " + " | ".join(f"seed {s}" for s in seeds)
              + f" | vs linear | vs best data-free ({label(summary, best)}) |",
              "|---|" + "---|" * (len(combos) + len(seeds) + 3)]
    for name in sorted(headline_rows(summary), key=lambda n: -summary["methods"][n]["mean"]):
        e = summary["methods"][name]
        lines.append(f"| {label(summary, name)} | **{e['mean']:.3f}** | "
                     + " | ".join(f"{e['per_combination'][c]:.3f}" for c in combos) + " | "
                     + " | ".join(f"{e['per_seed'][s]:.3f}" for s in seeds)
                     + f" | {fmt(e['vs linear'])} | {fmt(e[f'vs {best}'])} |")
    lines += ["", f"Per-combination paired differences against {label(summary, best)} (mean over seeds):", "",
              "| method | " + " | ".join(combos) + " |", "|---|" + "---|" * len(combos)]
    for name in sorted(headline_rows(summary), key=lambda n: -summary["methods"][n]["mean"]):
        e = summary["methods"][name][f"vs {best}"]
        lines.append(f"| {label(summary, name)} | " + " | ".join(f"{e['per_combination'][c]:+.3f}" for c in combos)
                     + " |")
    lines += ["", "## Knob grid (every row computed)", "", "| row | mean gain kept | vs linear |", "|---|---|---|"]
    for name, e in summary["methods"].items():
        lines.append(f"| {name} | {e['mean']:.3f} | {fmt(e['vs linear'])} |")
    lines += ["", "## Merged perplexities (mean over seeds)", "",
              "| combination | method | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains)]
    for combo in combos:
        for name in headline_rows(summary):
            ppl = report["merged_perplexity_mean"][combo][name]
            lines.append(f"| {combo} | {label(summary, name)} | "
                         + " | ".join(f"{ppl[d]:.2f}" if d in ppl else "" for d in domains) + " |")
    lines += ["", f"Command: `{report['command']}`; {report['machine']}.", ""]
    return "\n".join(lines)


def pilot_markdown(records: List[dict]) -> str:
    lines = ["# Pilot: the share of the fine-tunes' gain that `linear` keeps", "",
             "Mean over the combinations (all pairs and all at once) of the gain kept, averaged over each "
             "combination's domains. The benchmark counts when linear keeps at most about 0.85.", "",
             "| domains | steps | lr | schedule | seed | linear gain kept | per combination | "
             "fine-tune ppl (own domain) | base ppl |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {' '.join(r['domains'])} | {r['steps']} | {r['lr']:g} | {r.get('schedule', 'constant')} | {r['seed']} | **{r['mean']:.3f}** | "
                     + ", ".join(f"{c} {v:.3f}" for c, v in r["per_combination"].items()) + " | "
                     + ", ".join(f"{d} {v:.2f}" for d, v in r["finetune_ppl"].items()) + " | "
                     + ", ".join(f"{d} {v:.2f}" for d, v in r["base_ppl"].items()) + " |")
    return "\n".join(lines) + "\n"


def record_pilot(args, seed: int, scores, individual, base_ppl) -> None:
    path = RESULTS / f"pilot_{args.base}.json"
    records = json.loads(path.read_text()) if path.exists() else []
    key = (args.domains, args.steps, args.lr, args.schedule, seed, args.batch)
    records = [r for r in records
               if (r["domains"], r["steps"], r["lr"], r.get("schedule", "constant"), r["seed"], r["batch"]) != key]
    records.append({"domains": args.domains, "steps": args.steps, "lr": args.lr, "schedule": args.schedule,
                    "seed": seed, "batch": args.batch,
                    "mean": statistics.mean(scores["linear"].values()), "per_combination": scores["linear"],
                    "finetune_ppl": {d: individual[d][d] for d in args.domains}, "base_ppl": base_ppl})
    records.sort(key=lambda r: (r["domains"], r["lr"], r["steps"], r["seed"]))
    path.write_text(json.dumps(records, indent=2))
    (RESULTS / f"pilot_{args.base}.md").write_text(pilot_markdown(records))
    print(pilot_markdown(records))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    parser.add_argument("--base", choices=list(BASES), default="smollm2")
    parser.add_argument("--domains", nargs="+", default=["austen", "code", "email"], choices=DOMAINS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=40, help="continued-pretraining steps per domain")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    parser.add_argument("--schedule", choices=["linear", "constant"], default="linear",
                        help="linear: 10%% warmup, then decay to 0; constant: --lr throughout (resumable)")
    parser.add_argument("--samples", type=int, default=64, help="calibration examples per model")
    parser.add_argument("--eval-blocks", type=int, default=48, help="held-out 128-token windows per domain")
    parser.add_argument("--methods", nargs="+", default=[r.name for r in METHODS], choices=[r.name for r in METHODS])
    parser.add_argument("--pilot", action="store_true", help="linear only; append to results/pilot_<base>.*")
    args = parser.parse_args(argv)
    args.work = args.cache.resolve() / "llm_domains" / args.base
    rows = [r for r in METHODS if r.name == "linear" or (r.name in args.methods and not args.pilot)]
    started = time.time()
    base = BASES[args.base](args.cache.resolve())
    text_dir = assets.build_text(args.cache.resolve(), args.domains)
    text = {d: {s: text_dir / f"{d}_{s}.txt" for s in ("train", "test")} for d in args.domains}
    scorer = Scorer(base, text, args.eval_blocks)
    base_state: Dict[str, torch.Tensor] = {}

    def base_state_fn():
        if not base_state:
            base_state.update(floats(base))
        return base_state

    base_ppl = {d: cached(args.work / f"base-eval{args.eval_blocks}" / f"{d}.json",
                          lambda: {"perplexity": scorer.perplexity(base_state_fn(), d)})["perplexity"]
                for d in args.domains}
    per_seed, individual, cells, training, stage = {}, {}, {}, {}, {}
    for seed in args.seeds:
        begin = time.time()
        run = SeedRun(args, base, text, scorer, seed)
        stage[f"seed {seed}: fine-tunes (this run)"] = round(time.time() - begin)
        begin = time.time()
        individual[seed] = run.individual()
        cells[seed] = run.run_cells(rows, base_state_fn)
        stage[f"seed {seed}: statistics, merges and scoring (this run)"] = round(time.time() - begin)
        training[seed] = {d: {k: v for k, v in t.items() if k != "losses"} for d, t in run.training.items()}
        per_seed[seed] = score_seed(cells[seed], individual[seed], base_ppl)
        if args.pilot:
            record_pilot(args, seed, per_seed[seed], individual[seed], base_ppl)
        del run
    if args.pilot:
        return 0
    summary = summarize(per_seed, rows)
    combos = summary["combinations"]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only",
        "command": "nice -n 10 python examples/llm_domains/run.py " + shlex.join(
            argv if argv is not None else sys.argv[1:]),
        "base": args.base, "domains": args.domains,
        "training": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "schedule": args.schedule,
                     "per_seed": training},
        "eval_tokens_per_domain": args.eval_blocks * BLOCK, "calibration_samples": args.samples,
        "base_perplexity": base_ppl,
        "individual": {str(s): v for s, v in individual.items()},
        "individual_mean": {f"{args.base} (base)": base_ppl, **{
            f"{d} fine-tune": {e: statistics.mean(individual[s][d][e] for s in args.seeds) for e in args.domains}
            for d in args.domains}},
        "merged_perplexity_mean": {c: {r.name: {d: statistics.mean(cells[s][c][r.name]["perplexity"][d]
                                                                   for s in args.seeds) for d in c.split("+")}
                                       for r in rows} for c in combos},
        "cells": {str(s): v for s, v in cells.items()},
        "summary": summary,
        "stage_seconds_this_run": stage,
        "wall_seconds_this_run": round(time.time() - started),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.base}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{args.base}.md").write_text(markdown(report))
    print(markdown(report))
    log(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
