"""How close is a bfloat16 calibration to a float32 one, on real models?

    python examples/dtype_agreement/run.py [--cache examples/.cache]

Calibrates SmolLM2-135M (64 Austen paragraphs, length 128) and the MiniLM Rotten Tomatoes classifier of
``examples/paper_protocol`` (seed 0; 128 training reviews, length 64; skipped until it exists) three ways: weights in float32, weights loaded in
bfloat16 (``--dtype bfloat16``), and float32 weights under bf16 autocast (``--mixed-precision bf16``). For each
node group it reports the Spearman rank correlation with float32 and the largest relative difference
``max |F_bf16 - F_fp32| / max F_fp32``. Results: ``examples/dtype_agreement/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import assets  # noqa: E402
import torch  # noqa: E402

from mergekit_fisher_mask import CalibrationSettings, calibrate  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.flatten().double().argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def compare(model: Path, data: Path, work: Path, name: str, **settings) -> dict:
    variants = {"float32": dict(dtype="float32"), "bfloat16 weights": dict(dtype="bfloat16"),
                "bf16 autocast": dict(dtype="float32", mixed_precision="bf16")}
    fishers, seconds = {}, {}
    for label, options in variants.items():
        out = work / f"{name}-{label.replace(' ', '_')}.safetensors"
        start = time.perf_counter()
        fishers[label] = calibrate(str(model), str(data), out, CalibrationSettings(**settings, **options),
                                   overwrite=True, progress=False)
        seconds[label] = round(time.perf_counter() - start, 1)
    reference = fishers["float32"]
    report = {"seconds": seconds}
    for label in list(variants)[1:]:
        report[label] = {
            key: {"spearman": spearman(fishers[label].groups[key], values),
                  "max_rel_diff": float((fishers[label].groups[key] - values).abs().max() / values.abs().max())}
            for key, values in reference.groups.items()
        }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    args = parser.parse_args()
    cache = args.cache.resolve()
    work = cache / "dtype_agreement"
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    smollm2 = assets.fetch_smollm2(cache)
    text = assets.build_text(cache) / "austen_train.txt"
    report["SmolLM2-135M"] = compare(smollm2, text, work, "smollm2", samples=64, batch_size=16, max_length=128)
    classifier = cache / "paper_protocol" / "models" / "seed0" / "rotten_tomatoes"
    if (classifier / "config.json").exists():
        data = assets.task_dir(cache, "rotten_tomatoes") / "train.jsonl"
        report["MiniLM classifier"] = compare(classifier, data, work, "minilm", samples=128, batch_size=32, max_length=64)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "results.json").write_text(json.dumps(report, indent=2))
    lines = ["| model | variant | group | Spearman vs float32 | max relative difference |", "|---|---|---|---|---|"]
    for model, entry in report.items():
        if not isinstance(entry, dict):
            continue
        for variant, groups in entry.items():
            if variant == "seconds":
                continue
            lines += [f"| {model} | {variant} | {key} | {v['spearman']:.5f} | {v['max_rel_diff']:.2%} |"
                      for key, v in groups.items()]
    (results / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
