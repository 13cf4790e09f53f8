"""Benchmarks: calibration cost and memory against a forward pass, merge cost against `linear`, and scaling.

    python examples/benchmarks/run.py [--cache examples/.cache] [--repeats 3]

Needs the models of examples/paper_protocol/run.py (MiniLM classifiers) and examples/llm_domains/run.py
(SmolLM2 fine-tunes). Every measurement runs in a fresh process, so its peak RSS is its own; times exclude model
loading and tokenization. Medians and (min-max) spreads go to examples/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import assets  # noqa: E402

MODES = ("forward", "mask", "mask-batch", "full")


def measure_calibration(model: str, data: str, mode: str, samples: int, batch: int, length: int, chunk: int) -> dict:
    """Runs inside a fresh process: one pass of ``mode``; returns seconds (pass only) and peak RSS."""
    import torch

    from mergekit_fisher_mask import CalibrationSettings, compute_full_fisher, compute_mask_fisher, prepare_calibration

    settings = CalibrationSettings(samples=samples, batch_size=batch, max_length=length, chunk_size=chunk)
    run = prepare_calibration(model, data, settings, None, **({"attn_implementation": "eager"} if mode == "full" else {}))
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if mode == "forward":
        with torch.inference_mode():
            for batch_ in run.loader:
                run.model(**run.inputs(batch_))
    elif mode in ("mask", "mask-batch"):
        compute_mask_fisher(run.model, run.loader, settings, estimator="batch" if mode == "mask-batch" else "empirical",
                            accelerator=run.accelerator, progress=False)
    else:
        compute_full_fisher(run.model, run.loader, settings, accelerator=run.accelerator, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_after_load_mb": loaded_rss}


def in_subprocess(*args: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "_measure", *args], check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def timed_command(command) -> dict:
    """Wall time and peak RSS of a child process (its own, via wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"command failed: {' '.join(command)}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024}


def stats(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def lm_chunks(cache: Path, smollm: Path, out: Path, count: int = 32) -> Path:
    """``count`` text chunks of Austen that each tokenize to at least 128 tokens (truncated to 128 in calibration)."""
    if out.exists():
        return out
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm)
    ids = tokenizer((cache / "text" / "austen_train.txt").read_text())["input_ids"]
    rows = [{"text": tokenizer.decode(ids[i : i + 160])} for i in range(0, 160 * count, 160)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def calibration_table(name, model, data, batch, length, samples, chunk, repeats) -> dict:
    results = {}
    for mode in MODES:
        runs = [in_subprocess(str(model), str(data), mode, str(samples), str(batch), str(length), str(chunk))
                for _ in range(repeats)]
        results[mode] = {"seconds": stats([r["seconds"] for r in runs]),
                         "peak_rss_mb": stats([r["peak_rss_mb"] for r in runs]),
                         "rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in runs)}
        print(f"{name} {mode}: {results[mode]['seconds']['median']:.2f} s, "
              f"{results[mode]['peak_rss_mb']['median']:.0f} MB peak", flush=True)
    forward = results["forward"]["seconds"]["median"]
    for mode in MODES:
        results[mode]["ratio_to_forward"] = results[mode]["seconds"]["median"] / forward
        results[mode]["peak_ratio_to_forward"] = (results[mode]["peak_rss_mb"]["median"]
                                                  / results["forward"]["peak_rss_mb"]["median"])
    return results


def merge_recipe(path: Path, method: str, models, fishers) -> Path:
    import yaml

    entries = []
    for model, fisher in zip(models, fishers):
        parameters = {"weight": 1.0}
        if method == "fisher_mask":
            parameters["fisher"] = str(fisher)
        entries.append({"model": str(model), "parameters": parameters})
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(models[0]), "models": entries,
                                    "dtype": "float32"}))
    return path


def merge_cost(name, models, fishers, work, repeats, shard="500M") -> dict:
    results = {}
    runs = {"linear": [], "fisher_mask": []}
    for _ in range(repeats):
        for method in runs:  # alternate, so drift in machine load hits both alike
            recipe = merge_recipe(work / f"{name}-{method}.yml", method, models, fishers)
            command = ["mergekit-fisher", "merge", str(recipe), str(work / f"out-{name}-{method}"), "--overwrite",
                       "--quiet", "--heads", "base", "--out-shard-size", shard]
            runs[method].append(timed_command(command))
    for method, values in runs.items():
        results[method] = {"seconds": stats([v["seconds"] for v in values]),
                           "peak_rss_mb": stats([v["peak_rss_mb"] for v in values])}
    results["time_ratio"] = results["fisher_mask"]["seconds"]["median"] / results["linear"]["seconds"]["median"]
    results["peak_rss_ratio"] = (results["fisher_mask"]["peak_rss_mb"]["median"]
                                 / results["linear"]["peak_rss_mb"]["median"])
    print(f"merge {name}: time x{results['time_ratio']:.3f}, peak RSS x{results['peak_rss_ratio']:.3f}", flush=True)
    return results


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    work = cache / "benchmarks"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tasks = list(assets.TASKS)
    classifiers = [cache / "paper_protocol" / "models" / t for t in tasks]
    lm_models = [cache / "llm_domains" / d for d in ("austen", "brown")]
    missing = [str(p) for p in classifiers + lm_models if not (p / "config.json").exists()]
    if missing:
        sys.exit(f"Missing models {missing}: run examples/paper_protocol/run.py and examples/llm_domains/run.py first.")
    minilm_data = assets.task_dir(cache, "rotten_tomatoes") / "train.jsonl"
    lm_data = lm_chunks(cache, lm_models[0], work / "austen_chunks.jsonl")

    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only",
              "command": "python examples/benchmarks/run.py " + " ".join(sys.argv[1:]), "repeats": args.repeats}
    report["calibration"] = {
        "MiniLM classifier, 128 reviews, max_length 64, batch 32": calibration_table(
            "minilm", classifiers[0], minilm_data, 32, 64, 128, 8, args.repeats),
        "SmolLM2-135M, 32 x 128 tokens, batch 32": calibration_table(
            "smollm2", lm_models[0], lm_data, 32, 128, 32, 4, args.repeats),
    }

    from mergekit_fisher_mask import CalibrationSettings, calibrate, calibrate_full

    fishers, sizes = {}, {}
    for model, data, length in [(m, minilm_data if m in classifiers else lm_data, 64 if m in classifiers else 128)
                                for m in classifiers + lm_models]:
        data = assets.task_dir(cache, model.name) / "train.jsonl" if model in classifiers else data
        fishers[model] = work / f"{model.name}.mask.safetensors"
        if not fishers[model].exists():
            calibrate(str(model), str(data), fishers[model], CalibrationSettings(samples=32, max_length=length,
                                                                                  batch_size=32), progress=False)
    for model, data, length, chunk in ((classifiers[0], minilm_data, 64, 8), (lm_models[0], lm_data, 128, 4)):
        full = work / f"{model.name}.full"
        if not (full / "fisher.safetensors.index.json").exists():
            calibrate_full(str(model), str(data), full, CalibrationSettings(samples=32, max_length=length,
                                                                             batch_size=32, chunk_size=chunk),
                           progress=False)
        sizes[model.name] = {"mask_file_bytes": size_of(fishers[model]), "full_fisher_bytes": size_of(full),
                             "model_weights_bytes": size_of(model / "model.safetensors")}
    report["fisher_sizes"] = sizes

    report["merge"] = {
        "two SmolLM2-135M fine-tunes": merge_cost("smollm2", lm_models, [fishers[m] for m in lm_models], work,
                                                  args.repeats),
        "two MiniLM classifiers": merge_cost("minilm", classifiers[:2], [fishers[m] for m in classifiers[:2]], work,
                                             args.repeats),
    }
    report["scaling"] = {"calibration_minilm_mask": {}, "merge_minilm_models": {}}
    for samples in (128, 512, 2048):
        runs = [in_subprocess(str(classifiers[0]), str(minilm_data), "mask", str(samples), "32", "64", "8")
                for _ in range(args.repeats)]
        report["scaling"]["calibration_minilm_mask"][samples] = {
            "seconds": stats([r["seconds"] for r in runs]), "peak_rss_mb": stats([r["peak_rss_mb"] for r in runs])}
        print(f"scaling calibration {samples}: {statistics.median(r['seconds'] for r in runs):.2f} s", flush=True)
    for count in (2, 3, 4):
        recipe = merge_recipe(work / f"scale-{count}.yml", "fisher_mask", classifiers[:count],
                              [fishers[m] for m in classifiers[:count]])
        runs = [timed_command(["mergekit-fisher", "merge", str(recipe), str(work / f"scale-{count}"), "--overwrite",
                               "--quiet", "--heads", "base"]) for _ in range(args.repeats)]
        report["scaling"]["merge_minilm_models"][count] = {"seconds": stats([r["seconds"] for r in runs]),
                                                           "peak_rss_mb": stats([r["peak_rss_mb"] for r in runs])}
        print(f"scaling merge {count} models: {statistics.median(r['seconds'] for r in runs):.2f} s", flush=True)
    report["wall_seconds"] = round(time.time() - started)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "results.json").write_text(json.dumps(report, indent=2))
    (results / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    def spread(entry, fmt="{:.2f}"):
        return f"{fmt.format(entry['median'])} ({fmt.format(entry['min'])}-{fmt.format(entry['max'])})"

    lines = [f"Machine: {report['machine']}; medians of {report['repeats']} runs (min-max).", "",
             "### Calibration cost (pass only) and peak RSS (whole process)", "",
             "| setting | pass | seconds | x forward | peak RSS MB | x forward |", "|---|---|---|---|---|---|"]
    for setting, modes in report["calibration"].items():
        for mode, entry in modes.items():
            lines.append(f"| {setting} | {mode} | {spread(entry['seconds'])} | {entry['ratio_to_forward']:.2f} | "
                         f"{spread(entry['peak_rss_mb'], '{:.0f}')} | {entry['peak_ratio_to_forward']:.2f} |")
    lines += ["", "### Fisher file sizes", "", "| model | mask Fisher | full Fisher | model weights |", "|---|---|---|---|"]
    for model, entry in report["fisher_sizes"].items():
        lines.append(f"| {model} | {entry['mask_file_bytes'] / 1024:.1f} KiB | "
                     f"{entry['full_fisher_bytes'] / 2**20:.1f} MiB | {entry['model_weights_bytes'] / 2**20:.1f} MiB |")
    lines += ["", "### Merge cost: fisher_mask against linear (same shard size, `mergekit-fisher merge`)", "",
              "| models | linear s | fisher_mask s | time ratio | linear peak MB | fisher_mask peak MB | RSS ratio |",
              "|---|---|---|---|---|---|---|"]
    for name, entry in report["merge"].items():
        lines.append(f"| {name} | {spread(entry['linear']['seconds'])} | {spread(entry['fisher_mask']['seconds'])} | "
                     f"{entry['time_ratio']:.3f} | {spread(entry['linear']['peak_rss_mb'], '{:.0f}')} | "
                     f"{spread(entry['fisher_mask']['peak_rss_mb'], '{:.0f}')} | {entry['peak_rss_ratio']:.3f} |")
    lines += ["", "### Scaling", "", "| MiniLM mask calibration samples | seconds | peak RSS MB |", "|---|---|---|"]
    for samples, entry in report["scaling"]["calibration_minilm_mask"].items():
        lines.append(f"| {samples} | {spread(entry['seconds'])} | {spread(entry['peak_rss_mb'], '{:.0f}')} |")
    lines += ["", "| MiniLM models merged (fisher_mask) | seconds | peak RSS MB |", "|---|---|---|"]
    for count, entry in report["scaling"]["merge_minilm_models"].items():
        lines.append(f"| {count} | {spread(entry['seconds'])} | {spread(entry['peak_rss_mb'], '{:.0f}')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        model, data, mode, samples, batch, length, chunk = sys.argv[2:9]
        print(json.dumps(measure_calibration(model, data, mode, int(samples), int(batch), int(length), int(chunk))))
        sys.exit(0)
    sys.exit(main())
