"""GPU check: the mask pass against a forward pass on random-weight LLMs, in float32, bfloat16 and bf16 autocast, in
memory and offloaded to the CPU, plus a ``--cuda`` merge. Self-contained: the models are built from configs written
below, the batches are random token ids, and nothing is read from disk or the network.

    python examples/gpu_check/run.py --out DIR [--shapes smollm2-135m llama-1b llama-8b] [--budget 480]
    python examples/gpu_check/run.py --dry-run --out DIR        # CPU, tiny shapes: tests the script itself

On a lent GPU machine, which lacks mergekit, datasets and pydantic, carry their wheels (``.whl``, see
examples/README.md) and run, from the repository root::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site:$PWD python3 examples/gpu_check/run.py --out $OUT

What it measures, for each shape (one warm-up, then the median of ``--repeats`` timed passes):

* ``forward``: the model's own forward pass (logits included) under ``inference_mode``;
* ``mask``: the mask pass (empirical estimator) with the automatic micro-batch size, and the size it chose;
* ``gram``: RegMean's Gram pass (forward only, every linear input);
* peak accelerator memory of each;
* with ``--offload``: the same with a device map whose GPU budget is smaller than the model (CPU offload), and its
  head Fisher against the in-memory one;
* ``merge``: ``mergekit-fisher merge --cuda`` of two such models, ``fisher_mask`` against ``linear``.

Targets: mask pass <= 3x forward, bf16 no slower than float32. When a target is missed, one ``torch.profiler`` run of
the worst configuration lists the top kernels by time. Writes ``gpu_check.json`` to ``--out`` and prints one table.
Sections that would not fit ``--budget`` seconds are skipped and say so.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, where mergekit_fisher_mask lives

# Shapes of real models (weights random: timing does not depend on their values).
SHAPES: Dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=256, tie_word_embeddings=True),
}
# name -> (weight dtype, autocast); an 8B model runs in bfloat16 only (float32 weights alone would be 32 GB).
VARIANTS = {"float32": (torch.float32, "no"), "bfloat16": (torch.bfloat16, "no"),
            "float32 + bf16 autocast": (torch.float32, "bf16")}
BF16_ONLY = {"llama-8b"}
TARGET_MASK_OVER_FORWARD = 3.0


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Device:
    """The accelerator (or, in a dry run, the CPU) and its timing and memory counters."""

    def __init__(self, dry_run: bool):
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is None and not dry_run:
            sys.exit("No accelerator: this check is for a GPU machine (use --dry-run to test the script on a CPU).")
        self.device = torch.device("cpu") if dry_run or accelerator is None else torch.device(accelerator.type, 0)
        self.gpu = self.device.type != "cpu"
        self.module = getattr(torch, self.device.type) if self.gpu else None

    def name(self) -> str:
        return self.module.get_device_name(0) if self.gpu else f"CPU ({platform.machine()}), dry run"

    def sync(self) -> None:
        if self.gpu:
            torch.accelerator.synchronize()

    def reset_peak(self) -> None:
        if self.gpu:
            self.module.reset_peak_memory_stats()

    def peak_mb(self) -> Optional[float]:
        return self.module.max_memory_allocated() / 2**20 if self.gpu else None

    def free(self) -> None:
        gc.collect()
        if self.gpu:
            self.module.empty_cache()


def timed(device: Device, fn: Callable[[], object], repeats: int) -> dict:
    """One warm-up, then ``repeats`` timed calls: median seconds, all seconds, peak memory of the timed calls."""
    fn()
    device.sync()
    device.reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        device.sync()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "all_seconds": times, "peak_mb": device.peak_mb()}


def build(shape: str, dtype: torch.dtype, device: torch.device):
    """A random-weight Llama of ``shape``, created directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def random_batches(vocab: int, batch: int, length: int, count: int, device: torch.device) -> List[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, vocab, (batch, length), generator=generator).to(device),
             "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device)} for _ in range(count)]


def passes(model, batches, autocast: str, device: Device, repeats: int) -> dict:
    """Forward and mask pass of one loaded model (the mask pass's own micro-batch choice is reported)."""
    from mergekit_fisher_mask import CalibrationSettings, compute_gram, compute_mask_fisher
    from mergekit_fisher_mask.calibration import PassContext, micro_batch_sizer

    settings = CalibrationSettings(mixed_precision=autocast, batch_size=batches[0]["input_ids"].shape[0])
    context = PassContext.of(model, settings)
    def forward():
        cast = torch.autocast(device.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16")
        with torch.inference_mode(), cast:
            for batch in batches:
                model(**batch)

    def mask():
        return compute_mask_fisher(model, batches, settings, progress=False)

    def gram():
        return compute_gram(model, batches, settings, progress=False)

    report = {"forward": timed(device, forward, repeats), "mask": timed(device, mask, repeats),
              "gram": timed(device, gram, repeats),
              "micro_batch": micro_batch_sizer(model, context)(batches[0]["input_ids"].shape[1])}
    report["mask_x_forward"] = report["mask"]["seconds"] / report["forward"]["seconds"]
    report["gram_x_forward"] = report["gram"]["seconds"] / report["forward"]["seconds"]
    report["head_fisher"] = mask()[0]["head_fisher"]
    return report


def profile(model, batches, autocast: str, device: Device) -> dict:
    """Top kernels of one mask pass by device time (CPU time in a dry run), and how many ran."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    from mergekit_fisher_mask import CalibrationSettings, compute_mask_fisher

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.device.type == "cuda" else [])
    settings = CalibrationSettings(mixed_precision=autocast)
    with run_profiler(activities=activities) as prof:
        compute_mask_fisher(model, batches, settings, progress=False)
        device.sync()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.device.type == "cuda" else "self_cpu_time_total"
    return {"table": events.table(sort_by=sort, row_limit=15), "events": sum(e.count for e in events)}


def offload_check(work: Path, device: Device, args) -> dict:
    """The mask pass of a SmolLM2-shaped model in memory and under a device map that offloads most of it."""
    from mergekit_fisher_mask import CalibrationSettings, placed_model
    from mergekit_fisher_mask.calibration import Placement

    shape = "tiny" if args.dry_run else "smollm2-135m"
    folder = work / f"offload-{shape}"
    build(shape, torch.float32, torch.device("cpu")).save_pretrained(folder)
    vocab = SHAPES[shape]["vocab_size"]
    batches = random_batches(vocab, args.batch, args.length, args.batches, torch.device("cpu"))
    budget = {0: args.gpu_budget, "cpu": "64GiB"} if device.gpu else {"cpu": "100KB"}
    results = {}
    for name, settings in {
        "in memory": CalibrationSettings(dtype="float32"),
        "device map": CalibrationSettings(dtype="float32", device_map="auto", max_memory=budget,
                                          offload_folder=str(work / "offload-weights")),
    }.items():
        with placed_model(folder, settings) as model:
            placement = Placement.of(model)
            inputs = [{k: v.to(placement.input_device) for k, v in b.items()} for b in batches]
            report = passes(model, inputs, "no", device, args.repeats)
            report["placement"] = sorted({str(p) for p in (placement.device_map or {"": placement.input_device}).values()})
            report["checkpointing"] = placement.checkpointing
            results[name] = report
        device.free()
    reference, offloaded = results["in memory"].pop("head_fisher"), results["device map"].pop("head_fisher")
    results["head_fisher_max_rel_diff"] = float((offloaded - reference).abs().max() / reference.abs().max())
    return {"shape": shape, "gpu_budget": args.gpu_budget if device.gpu else "cpu=100KB (disk offload)", **results}


def merge_check(work: Path, device: Device, args) -> dict:
    """``mergekit-fisher merge --cuda`` of two random models: ``fisher_mask`` (calibrated here) against ``linear``."""
    import yaml
    from mergekit.options import MergeOptions

    from mergekit_fisher_mask import MaskFisher, NodeShape, compute_mask_fisher
    from mergekit_fisher_mask.checkpoints import model_fingerprint
    from mergekit_fisher_mask.pipeline import run_fisher_merge

    shape = "tiny" if args.dry_run else args.merge_shape
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    folders, fishers = [], []
    for seed in range(2):
        folder = work / f"merge-{shape}-{seed}"
        model = build(shape, dtype, device.device)
        with torch.no_grad():
            for parameter in model.parameters():  # two different "fine-tunes" of one random base
                parameter.add_(torch.randn_like(parameter), alpha=0.01 * (seed + 1))
        model.save_pretrained(folder)
        batches = random_batches(model.config.vocab_size, args.batch, args.length, 1, device.device)
        groups, count = compute_mask_fisher(model, batches, progress=False)
        record = MaskFisher(groups=groups, shape=NodeShape.from_config(model.config), fingerprint=model_fingerprint(folder),
                            samples=count, estimator="empirical", loss="causal_lm", model=str(folder),
                            data={"source": "random token ids"})
        fishers.append(record.save(work / f"merge-{shape}-{seed}.fisher.safetensors"))
        folders.append(folder)
        del model
        device.free()
    options = MergeOptions(cuda=device.gpu, quiet=True, copy_tokenizer=False, out_shard_size=2 * 10**9)
    report = {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "cuda": device.gpu}
    for method in ("linear", "fisher_mask", "linear", "fisher_mask"):  # the second round is the one reported
        recipe = work / f"{method}.yml"
        parameters = [{"weight": 1.0} if method == "linear" else {"fisher": str(f)} for f in fishers]
        recipe.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(folders[0]), "dtype": "bfloat16",
                                          "models": [{"model": str(m), "parameters": p}
                                                     for m, p in zip(folders, parameters)]}))
        device.sync()
        start = time.perf_counter()
        run_fisher_merge(str(recipe), str(work / f"merged-{method}"), options, overwrite=True, cache_dir=work / "cache")
        report[f"{method}_seconds"] = time.perf_counter() - start
    report["fisher_mask_over_linear"] = report["fisher_mask_seconds"] / report["linear_seconds"]
    return report


def table(report: dict) -> str:
    lines = ["| model | weights | forward s | mask s | mask / forward | Gram s | Gram / forward | micro-batch | "
             "peak MB forward / mask / Gram |", "|---|---|---|---|---|---|---|---|---|"]

    def row(model: str, variant: str, entry: dict) -> str:
        peaks = " / ".join(f"{entry[p]['peak_mb']:.0f}" if entry[p]["peak_mb"] is not None else "-"
                           for p in ("forward", "mask", "gram"))
        return (f"| {model} | {variant} | {entry['forward']['seconds']:.3f} | {entry['mask']['seconds']:.3f} | "
                f"{entry['mask_x_forward']:.2f}x | {entry['gram']['seconds']:.3f} | {entry['gram_x_forward']:.2f}x | "
                f"{entry['micro_batch']} | {peaks} |")

    for model, variants in report["passes"].items():
        for variant, entry in variants.items():
            lines.append(row(model, variant, entry) if "forward" in entry else f"| {model} | {variant} | {entry} |||||||")
    offload = report.get("offload", {})
    for name in ("in memory", "device map"):
        if name in offload:
            lines.append(row(f"{offload['shape']} (offload check)", f"float32, {name}", offload[name]))
    merge = report.get("merge", {})
    if "linear_seconds" in merge:
        lines += ["", f"merge ({merge['shape']}, {merge['dtype']}, cuda={merge['cuda']}): linear "
                      f"{merge['linear_seconds']:.1f} s, fisher_mask {merge['fisher_mask_seconds']:.1f} s "
                      f"({merge['fisher_mask_over_linear']:.2f}x)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-1b", "llama-8b"], choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batches", type=int, default=2, help="batches per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-budget", default="200MB", help="GPU 0's max_memory in the offload check")
    parser.add_argument("--merge-shape", default="llama-1b", choices=list(SHAPES))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, one repeat: tests the script")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.shapes, args.batch, args.length, args.batches, args.repeats = ["tiny"], 2, 32, 1, 1
    device = Device(args.dry_run)
    out = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    import transformers

    report = {"device": device.name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "batch": args.batch, "length": args.length, "batches": args.batches, "repeats": args.repeats,
              "float32_matmul_precision": torch.get_float32_matmul_precision(), "passes": {}}
    worst = None  # (mask / forward, shape, variant)
    for shape in args.shapes:
        report["passes"][shape] = {}
        for variant, (dtype, autocast) in VARIANTS.items():
            if shape in BF16_ONLY and variant != "bfloat16":
                continue
            if time.time() - started > args.budget * 0.6:
                report["passes"][shape][variant] = "skipped: time budget"
                continue
            log(f"{shape}, {variant}")
            model = build(shape, dtype, device.device)
            batches = random_batches(model.config.vocab_size, args.batch, args.length, args.batches, device.device)
            entry = passes(model, batches, autocast, device, args.repeats)
            entry.pop("head_fisher")
            report["passes"][shape][variant] = entry
            if worst is None or entry["mask_x_forward"] > worst[0]:
                worst = (entry["mask_x_forward"], shape, variant)
            del model, batches
            device.free()
    slower_bf16 = [s for s, v in report["passes"].items() if isinstance(v.get("bfloat16"), dict)
                   and isinstance(v.get("float32"), dict) and v["bfloat16"]["mask"]["seconds"] > v["float32"]["mask"]["seconds"]]
    report["bf16_mask_slower_than_float32"] = slower_bf16
    if worst is not None and (worst[0] > TARGET_MASK_OVER_FORWARD or slower_bf16):
        _, shape, variant = worst
        log(f"profiling {shape}, {variant} (target missed)")
        dtype, autocast = VARIANTS[variant]
        model = build(shape, dtype, device.device)
        batches = random_batches(model.config.vocab_size, args.batch, args.length, 1, device.device)
        report["profile"] = {"shape": shape, "variant": variant, **profile(model, batches, autocast, device)}
        print(report["profile"]["table"], flush=True)
        del model, batches
        device.free()
    for name, section in (("offload", offload_check), ("merge", merge_check)):
        if time.time() - started > args.budget * 0.8:
            report[name] = {"skipped": "time budget"}
            continue
        log(name)
        report[name] = section(work, device, args)
        device.free()
    report["seconds"] = round(time.time() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(table(report), flush=True)
    log(f"done in {report['seconds']} s; wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
