"""A real LLM merge: SmolLM2-135M continued-pretrained on two domains (Austen, Brown), merged with `linear` and
`fisher_mask` through `mergekit-fisher merge`, scored by held-out perplexity on both domains.

    python examples/llm_domains/run.py [--cache examples/.cache] [--steps 60]

Every step is cached under ``<cache>/llm_domains``. The recipes are ``examples/llm_domains/*.yml``, exactly as a
user writes them (paths relative to the repository root, where the command runs). Results go to
``examples/llm_domains/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

import assets  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

DOMAINS = ("austen", "brown")
BLOCK = 128


def log(message: str) -> None:
    print(f"[llm_domains {time.strftime('%H:%M:%S')}] {message}", flush=True)


def blocks(tokenizer, path: Path, count: int, seed: int) -> torch.Tensor:
    """``count`` random BLOCK-token windows (B, T) of a text file's token stream."""
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"][0]
    starts = list(range(0, len(ids) - BLOCK, BLOCK))
    random.Random(seed).shuffle(starts)
    return torch.stack([ids[s : s + BLOCK] for s in starts[:count]])


def continue_pretraining(base: Path, text: Path, out: Path, steps: int, batch: int, lr: float) -> dict:
    """A short CPU-sized continued pre-training run; skipped if ``out`` is complete."""
    done = out / "train.json"
    if done.exists():
        return json.loads(done.read_text())
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


@torch.inference_mode()
def perplexity(model_dir: Path, text: Path, count: int) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = blocks(tokenizer, text, count, seed=1)
    losses = [model(input_ids=data[i : i + 8], labels=data[i : i + 8]).loss for i in range(0, len(data), 8)]
    return math.exp(float(torch.stack(losses).mean()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    parser.add_argument("--steps", type=int, default=60, help="continued-pretraining steps per domain")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval-blocks", type=int, default=48, help="held-out 128-token blocks per domain")
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    work = cache / "llm_domains"
    started = time.time()

    log("assets")
    assets.fetch_smollm2(cache)
    assets.build_text(cache)
    base = assets.smollm2_path(cache)
    text = {d: {split: cache / "text" / f"{d}_{split}.txt" for split in ("train", "test")} for d in DOMAINS}

    log("continued pre-training")
    training = {d: continue_pretraining(base, text[d]["train"], work / d, args.steps, args.batch, args.lr)
                for d in DOMAINS}

    merged = {}
    for method in ("linear", "fisher_mask"):
        recipe = HERE / f"{method}.yml"
        if cache != assets.DEFAULT_CACHE.resolve():  # the committed recipes name the default cache folder
            text_ = recipe.read_text().replace("examples/.cache", str(cache))
            recipe = work / recipe.name
            recipe.write_text(text_)
        out = work / f"merged-{method}"
        if not (out / "fisher_merge.json").exists():
            log(f"merge: {recipe}")
            start = time.time()
            subprocess.run(["mergekit-fisher", "merge", str(recipe), str(out), "--overwrite",
                            "--fisher-cache", str(work / "fisher-cache")], check=True, cwd=REPO)
            (work / f"merge-{method}-seconds.txt").write_text(f"{time.time() - start:.1f}")
        merged[method] = out

    log("perplexity")
    candidates = {"SmolLM2-135M (base)": base, "austen fine-tune": work / "austen", "brown fine-tune": work / "brown",
                  "linear merge": merged["linear"], "fisher_mask merge": merged["fisher_mask"]}
    table = {name: {d: perplexity(path, text[d]["test"], args.eval_blocks) for d in DOMAINS}
             for name, path in candidates.items()}
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only",
        "command": "python examples/llm_domains/run.py " + " ".join(sys.argv[1:]),
        "training": training,
        "perplexity": table,
        "eval_tokens_per_domain": args.eval_blocks * BLOCK,
        "wall_seconds_this_run": round(time.time() - started),
    }
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "results.json").write_text(json.dumps(report, indent=2))
    lines = ["| model | Austen held-out ppl | Brown held-out ppl | mean |", "|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row['austen']:.2f} | {row['brown']:.2f} | {(row['austen'] + row['brown']) / 2:.2f} |")
    (results / "results.md").write_text("\n".join(lines) + "\n")
    shutil.copy(HERE / "fisher_mask.yml", results / "fisher_mask.yml")
    print("\n".join(lines))
    log(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
