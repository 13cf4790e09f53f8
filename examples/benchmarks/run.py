"""Benchmarks: calibration cost and memory against a forward pass (mask Fisher, full Fisher, RegMean's Grams), file
sizes (measured, and the Gram formula for 1B-70B models), merge cost against `linear`, and scaling.

    python examples/benchmarks/run.py [--cache examples/.cache] [--repeats 3]
    python examples/benchmarks/run.py --calibration-only [--repeats 2]   # results/calibration.{json,md}

Needs the MiniLM classifiers of examples/merge_grid/run.py (seed 0) and the SmolLM2 asset (examples/assets.py); the
second SmolLM2 of the merge benchmark is the base with small random changes, made here. Every measurement runs in a
fresh process, so its peak RSS is its own; times exclude model loading and tokenization. Run it on an otherwise idle
machine. Medians and (min-max) spreads go to examples/benchmarks/results/. ``--calibration-only`` measures the
calibration passes alone (SmolLM2, and MiniLM when its classifier is there) into results/calibration.{json,md}.
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
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import assets  # noqa: E402

MODES = ("forward", "mask", "mask-batch", "full", "gram", "mask+gram")  # mask+gram: one pass, both
# Llama shapes of the Gram size table: (hidden, FFN, layers, heads, KV heads)
SIZE_TABLE = {"Llama-3.2-1B": (2048, 8192, 16, 32, 8), "Llama-3.1-8B": (4096, 14336, 32, 32, 8),
              "Llama-3.1-70B": (8192, 28672, 80, 64, 8)}


def measure_calibration(model: str, data: str, mode: str, samples: int, batch: int, length: int, chunk: int) -> dict:
    """Runs inside a fresh process: one pass of ``mode``; returns seconds (pass only) and peak RSS."""
    import torch

    from mergekit_fisher_mask import (
        CalibrationSettings,
        compute_full_fisher,
        compute_gram,
        compute_mask_fisher,
        prepare_calibration,
    )

    settings = CalibrationSettings(samples=samples, batch_size=batch, max_length=length, chunk_size=chunk)
    run = prepare_calibration(model, data, settings, None, **({"attn_implementation": "eager"} if mode == "full" else {}))
    loaded_rss = own_peak_rss_mb()
    start = time.perf_counter()
    if mode == "forward":
        with torch.inference_mode():
            for batch_ in run.loader:
                run.model(**run.inputs(batch_))
    elif mode in ("mask", "mask-batch"):
        compute_mask_fisher(run.model, run.loader, settings, estimator="batch" if mode == "mask-batch" else "empirical",
                            accelerator=run.accelerator, progress=False)
    elif mode == "gram":
        compute_gram(run.model, run.loader, settings, accelerator=run.accelerator, progress=False)
    elif mode == "mask+gram":  # what calibrate(..., gram_out=...) runs
        from mergekit_fisher_mask.calibration import GramInputs

        with GramInputs(run.model) as grams:
            compute_mask_fisher(run.model, run.loader, settings, accelerator=run.accelerator, progress=False,
                                rider=grams)
    else:
        compute_full_fisher(run.model, run.loader, settings, accelerator=run.accelerator, progress=False)
    seconds = time.perf_counter() - start
    peak = own_peak_rss_mb()
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_after_load_mb": loaded_rss}


def own_peak_rss_mb() -> float:
    """This process's own peak RSS (``VmHWM`` of its address space). ``ru_maxrss`` is not: Linux carries the high-water
    mark of the address space a child replaced at ``exec``, i.e. of the parent that forked it, into the child's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def in_subprocess(*args: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "_measure", *args], check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def timed_command(command) -> dict:
    """Wall time and own peak RSS of ``mergekit-fisher <args>``, run in a child that reports its ``VmHWM`` at exit."""
    if command[0] != "mergekit-fisher":
        raise ValueError(f"timed_command runs mergekit-fisher commands only, got {command[0]}")
    start = time.perf_counter()
    output = subprocess.run([sys.executable, __file__, "_cli", *command[1:]], capture_output=True, text=True)
    if output.returncode != 0:
        raise RuntimeError(f"command failed: {' '.join(command)}\n{output.stderr[-2000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": json.loads(output.stdout.strip().splitlines()[-1])}


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


def merge_recipe(path: Path, method: str, models, statistics_files) -> Path:
    """A recipe merging ``models`` with ``method``; ``statistics_files`` maps each method to the models' files."""
    import yaml

    from mergekit_fisher_mask import PLUGIN_METHODS

    entries = []
    for index, model in enumerate(models):
        parameters = {"weight": 1.0}
        if method in PLUGIN_METHODS:
            parameters[PLUGIN_METHODS[method].parameter] = str(statistics_files[method][index])
        entries.append({"model": str(model), "parameters": parameters})
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(models[0]), "models": entries,
                                    "dtype": "float32"}))
    return path


def merge_cost(name, models, files, work, repeats, shard="500M") -> dict:
    results = {}
    runs = {"linear": [], "fisher_mask": [], "regmean": []}
    for _ in range(repeats):
        for method in runs:  # alternate, so drift in machine load hits every method alike
            recipe = merge_recipe(work / f"{name}-{method}.yml", method, models, files)
            command = ["mergekit-fisher", "merge", str(recipe), str(work / f"out-{name}-{method}"), "--overwrite",
                       "--quiet", "--heads", "base", "--out-shard-size", shard]
            runs[method].append(timed_command(command))
    for method, values in runs.items():
        results[method] = {"seconds": stats([v["seconds"] for v in values]),
                           "peak_rss_mb": stats([v["peak_rss_mb"] for v in values])}
    for method in ("fisher_mask", "regmean"):
        results[f"{method}_time_ratio"] = results[method]["seconds"]["median"] / results["linear"]["seconds"]["median"]
        results[f"{method}_peak_rss_ratio"] = (results[method]["peak_rss_mb"]["median"]
                                               / results["linear"]["peak_rss_mb"]["median"])
        print(f"merge {name} {method}: time x{results[f'{method}_time_ratio']:.3f}, peak RSS "
              f"x{results[f'{method}_peak_rss_ratio']:.3f}", flush=True)
    return results


def perturbed(model: Path, out: Path) -> Path:
    """A copy of ``model`` with small random changes to every weight (a second model to merge; cached)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    copy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=1e-3)
    copy.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def predicted_gram_bytes(model: Path) -> int:
    """The Gram pass's own size estimate (its free-space check), for comparison with the folder written."""
    from transformers import AutoConfig

    from mergekit_fisher_mask import CalibrationSettings
    from mergekit_fisher_mask.calibration.gram_pass import PASS

    return PASS.output_bytes(model, AutoConfig.from_pretrained(model), CalibrationSettings())


def gram_table_row(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> dict:
    """Predicted Gram folder sizes of a Llama shape: every input, and without the FFN output (ffn_out), in float32
    and bfloat16."""
    from transformers import LlamaConfig

    from mergekit_fisher_mask import CalibrationSettings
    from mergekit_fisher_mask.calibration.gram_pass import PASS

    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads)
    row = {}
    for label, options in {"all, float32": {}, "all, bfloat16": {"gram_dtype": "bfloat16"},
                           "no ffn_out, float32": {"gram_inputs": ("attn_in", "attn_out", "ffn_in")},
                           "no ffn_out, bfloat16": {"gram_inputs": ("attn_in", "attn_out", "ffn_in"),
                                                    "gram_dtype": "bfloat16"}}.items():
        row[label] = PASS.output_bytes(None, config, CalibrationSettings(**options))
    return row


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration-only", action="store_true",
                        help="only the calibration passes; results/calibration.{json,md}")
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    work = cache / "benchmarks"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tasks = list(assets.TASKS)
    classifiers = [cache / "paper_protocol" / "models" / "seed0" / t for t in tasks]
    missing = [str(p) for p in classifiers if not (p / "config.json").exists()]
    if args.calibration_only:
        return calibration_only(cache, work, None if missing else classifiers[0], args.repeats)
    if missing:
        sys.exit(f"Missing models {missing}: run examples/merge_grid/run.py first.")
    lm_models = [assets.fetch_smollm2(cache), perturbed(assets.fetch_smollm2(cache), work / "smollm2-perturbed")]
    minilm_data = assets.task_dir(cache, "rotten_tomatoes") / "train.jsonl"
    lm_data = lm_chunks(cache, lm_models[0], work / "austen_chunks.jsonl")

    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only",
              "command": "python examples/benchmarks/run.py " + " ".join(sys.argv[1:]), "repeats": args.repeats}
    report["calibration"] = calibration_tables(classifiers[0], minilm_data, lm_models[0], lm_data, args.repeats)

    from mergekit_fisher_mask import CalibrationSettings, calibrate, calibrate_full, calibrate_gram

    files = {"fisher_mask": {}, "regmean": {}}
    sizes = {}
    for model in classifiers + lm_models:
        data, length = (assets.task_dir(cache, model.name) / "train.jsonl", 64) if model in classifiers else (lm_data, 128)
        settings = CalibrationSettings(samples=32, max_length=length, batch_size=32)
        files["fisher_mask"][model] = work / f"{model.name}.mask.safetensors"
        files["regmean"][model] = work / f"{model.name}.gram"
        if not files["fisher_mask"][model].exists():
            calibrate(str(model), str(data), files["fisher_mask"][model], settings, progress=False)
        if not files["regmean"][model].exists():
            calibrate_gram(str(model), str(data), files["regmean"][model], settings, progress=False)
    for model, data, length, chunk in ((classifiers[0], minilm_data, 64, 8), (lm_models[0], lm_data, 128, 4)):
        full = work / f"{model.name}.full"
        if not (full / "fisher.safetensors.index.json").exists():
            calibrate_full(str(model), str(data), full, CalibrationSettings(samples=32, max_length=length,
                                                                             batch_size=32, chunk_size=chunk),
                           progress=False)
        sizes[model.name] = {"mask_file_bytes": size_of(files["fisher_mask"][model]), "full_fisher_bytes": size_of(full),
                             "gram_folder_bytes": size_of(files["regmean"][model]),
                             "gram_predicted_bytes": predicted_gram_bytes(model),
                             "model_weights_bytes": size_of(model / "model.safetensors")}
    report["fisher_sizes"] = sizes
    report["gram_size_table"] = {name: gram_table_row(*shape) for name, shape in SIZE_TABLE.items()}

    report["merge"] = {
        "two SmolLM2-135M models": merge_cost("smollm2", lm_models, {m: [f[x] for x in lm_models] for m, f in files.items()},
                                              work, args.repeats),
        "two MiniLM classifiers": merge_cost("minilm", classifiers[:2],
                                             {m: [f[x] for x in classifiers[:2]] for m, f in files.items()}, work,
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
                              {"fisher_mask": [files["fisher_mask"][m] for m in classifiers[:count]]})
        runs = [timed_command(["mergekit-fisher", "merge", str(recipe), str(work / f"scale-{count}"), "--overwrite",
                               "--quiet", "--heads", "base"]) for _ in range(args.repeats)]
        report["scaling"]["merge_minilm_models"][count] = {"seconds": stats([r["seconds"] for r in runs]),
                                                           "peak_rss_mb": stats([r["peak_rss_mb"] for r in runs])}
        print(f"scaling merge {count} models: {statistics.median(r['seconds'] for r in runs):.2f} s", flush=True)
    report["wall_seconds"] = round(time.time() - started)
    return write_report("results", report, markdown(report))


def calibration_tables(minilm: Optional[Path], minilm_data: Path, smollm: Path, lm_data: Path, repeats: int) -> dict:
    """The calibration cost tables of both settings (MiniLM's only when ``minilm`` is given)."""
    tables = {}
    if minilm is not None:
        tables["MiniLM classifier, 128 reviews, max_length 64, batch 32"] = calibration_table(
            "minilm", minilm, minilm_data, 32, 64, 128, 8, repeats)
    tables["SmolLM2-135M, 32 x 128 tokens, batch 32"] = calibration_table(
        "smollm2", smollm, lm_data, 32, 128, 32, 4, repeats)
    return tables


def calibration_only(cache: Path, work: Path, minilm: Optional[Path], repeats: int) -> int:
    smollm = assets.fetch_smollm2(cache)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only",
              "command": "python examples/benchmarks/run.py " + " ".join(sys.argv[1:]), "repeats": repeats,
              "calibration": calibration_tables(minilm, assets.task_dir(cache, "rotten_tomatoes") / "train.jsonl",
                                                smollm, lm_chunks(cache, smollm, work / "austen_chunks.jsonl"),
                                                repeats)}
    return write_report("calibration", report, calibration_markdown(report))


def write_report(stem: str, report: dict, text: str) -> int:
    """results/<stem>.json and .md, and the tables on stdout."""
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (results / f"{stem}.md").write_text(text)
    print(text)
    return 0


def spread(entry, fmt="{:.2f}"):
    return f"{fmt.format(entry['median'])} ({fmt.format(entry['min'])}-{fmt.format(entry['max'])})"


def calibration_markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; medians of {report['repeats']} runs (min-max). Command: "
             f"`{report['command']}`.", "",
             "### Calibration cost (pass only) and peak RSS (whole process)", "",
             "`mask+gram` is one pass measuring both (`calibrate --gram-out`).", "",
             "| setting | pass | seconds | x forward | peak RSS MB | x forward |", "|---|---|---|---|---|---|"]
    for setting, modes in report["calibration"].items():
        for mode, entry in modes.items():
            lines.append(f"| {setting} | {mode} | {spread(entry['seconds'])} | {entry['ratio_to_forward']:.2f} | "
                         f"{spread(entry['peak_rss_mb'], '{:.0f}')} | {entry['peak_ratio_to_forward']:.2f} |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    lines = calibration_markdown(report).rstrip("\n").split("\n")
    lines += ["", "### File sizes", "", "| model | mask Fisher | full Fisher | Gram folder (predicted) | model weights |",
              "|---|---|---|---|---|"]
    for model, entry in report["fisher_sizes"].items():
        lines.append(f"| {model} | {entry['mask_file_bytes'] / 1024:.1f} KiB | "
                     f"{entry['full_fisher_bytes'] / 2**20:.1f} MiB | {entry['gram_folder_bytes'] / 2**20:.1f} MiB "
                     f"({entry['gram_predicted_bytes'] / 2**20:.1f}) | {entry['model_weights_bytes'] / 2**20:.1f} MiB |")
    columns = list(next(iter(report["gram_size_table"].values())))
    lines += ["", "### Predicted Gram folder per model (the formula the free-space check uses)", "",
              "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in report["gram_size_table"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c] / 1e9:.1f} GB" for c in columns) + " |")
    lines += ["", "### Merge cost against linear (same shard size, `mergekit-fisher merge`)", "",
              "| models | linear s | fisher_mask s | regmean s | time ratios | linear peak MB | fisher_mask MB | "
              "regmean MB |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in report["merge"].items():
        lines.append(f"| {name} | {spread(entry['linear']['seconds'])} | {spread(entry['fisher_mask']['seconds'])} | "
                     f"{spread(entry['regmean']['seconds'])} | {entry['fisher_mask_time_ratio']:.2f} / "
                     f"{entry['regmean_time_ratio']:.2f} | {spread(entry['linear']['peak_rss_mb'], '{:.0f}')} | "
                     f"{spread(entry['fisher_mask']['peak_rss_mb'], '{:.0f}')} | "
                     f"{spread(entry['regmean']['peak_rss_mb'], '{:.0f}')} |")
    lines += ["", "### Scaling", "", "| MiniLM mask calibration samples | seconds | peak RSS MB |", "|---|---|---|"]
    for samples, entry in report["scaling"]["calibration_minilm_mask"].items():
        lines.append(f"| {samples} | {spread(entry['seconds'])} | {spread(entry['peak_rss_mb'], '{:.0f}')} |")
    lines += ["", "| MiniLM models merged (fisher_mask) | seconds | peak RSS MB |", "|---|---|---|"]
    for count, entry in report["scaling"]["merge_minilm_models"].items():
        lines.append(f"| {count} | {spread(entry['seconds'])} | {spread(entry['peak_rss_mb'], '{:.0f}')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_cli":  # the CLI in this process, then its own peak RSS
        from mergekit_fisher_mask.cli import run as cli_run

        sys.argv = ["mergekit-fisher", *sys.argv[2:]]
        try:
            cli_run()
        finally:
            print(json.dumps(own_peak_rss_mb()), flush=True)
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        model, data, mode, samples, batch, length, chunk = sys.argv[2:9]
        print(json.dumps(measure_calibration(model, data, mode, int(samples), int(batch), int(length), int(chunk))))
        sys.exit(0)
    sys.exit(main())
