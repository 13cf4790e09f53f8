"""GPU check for LLM-scale calibration: the mask pass against a forward pass, float32 and bfloat16 weights, in memory
and with a device map whose GPU budget is smaller than the model (the rest offloaded to the CPU).

    python examples/gpu_check/llm_scale.py --model DIR --text FILE --out DIR [--batch 16] [--length 512]

``--model`` is SmolLM2-135M as ``examples/assets.py smollm2`` converts it; ``--text`` a plain-text file (e.g. the
Austen training text). Every configuration is warmed up once before it is timed (first use of bf16 kernels and the
allocator's growth are not measured), then timed over ``--repeats`` passes of ``--batches`` batches; the median is
reported. Targets: mask pass <= 3x forward, bf16 no slower than float32. Writes ``llm_scale.json`` to ``--out``.
``--dry-run`` runs it on a CPU with tiny sizes, to test the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mergekit_fisher_mask import CalibrationSettings, compute_mask_fisher, model_inputs, prepare_calibration
from mergekit_fisher_mask.calibrate import Placement


def windows(tokenizer_dir: str, text: Path, count: int, length: int, out: Path) -> Path:
    """``count`` texts of about ``length`` tokens each, cut from ``text`` (jsonl, one per line)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(text.read_text(encoding="utf-8")[: count * length * 8])["input_ids"]
    rows = [tokenizer.decode(ids[i * length : (i + 1) * length - 2]) for i in range(count)]
    out.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up: kernels, allocator, autotuning
    times, peaks = [], []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        peaks.append(torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0)
    return {"seconds": statistics.median(times), "all_seconds": times, "peak_cuda_mb": max(peaks)}


def configuration(model: str, data: Path, settings: CalibrationSettings, repeats: int) -> dict:
    run = prepare_calibration(model, str(data), settings)
    batches = list(run.loader)
    placement = Placement.of(run.model, run.accelerator.device)

    @torch.inference_mode()
    def forward():
        for batch in batches:
            run.model(**model_inputs({k: v.to(placement.input_device) for k, v in batch.items()}))

    def mask():
        compute_mask_fisher(run.model, batches, accelerator=run.accelerator, progress=False,
                            mixed_precision=settings.mixed_precision)

    report = {"dtype": str(run.model.dtype), "device_map": placement.device_map and sorted(set(map(str, placement.device_map.values()))),
              "checkpointing": placement.checkpointing, "forward": timed(forward, repeats), "mask": timed(mask, repeats)}
    report["mask_x_forward"] = report["mask"]["seconds"] / report["forward"]["seconds"]
    groups, _ = compute_mask_fisher(run.model, batches, accelerator=run.accelerator, progress=False)
    report["head_fisher"] = groups["head_fisher"].tolist()
    run.cleanup()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-budget", default="300MB", help="GPU 0's --max-memory in the device-map run")
    parser.add_argument("--dry-run", action="store_true", help="allow a CPU run with tiny sizes (tests the script)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("No CUDA device: this check is for a GPU machine (use --dry-run to test the script on a CPU).")
    args.out.mkdir(parents=True, exist_ok=True)
    data = windows(args.model, args.text, args.batch * args.batches, args.length, args.out / "windows.jsonl")
    common = dict(samples=args.batch * args.batches, batch_size=args.batch, max_length=args.length)
    gpu = torch.cuda.is_available()
    configs = {
        "float32": CalibrationSettings(**common, dtype="float32"),
        "bfloat16": CalibrationSettings(**common, dtype="bfloat16"),
        "float32 + bf16 autocast": CalibrationSettings(**common, dtype="float32", mixed_precision="bf16"),
        "float32, device map": CalibrationSettings(
            **common, dtype="float32", device_map="auto",
            max_memory=f"0={args.gpu_budget},cpu=64GiB" if gpu else "cpu=100MB", offload_folder=str(args.out / "off")),
    }
    report = {"gpu": torch.cuda.get_device_name() if gpu else "none (dry run)", "torch": torch.__version__,
              "batch": args.batch, "length": args.length, "batches": args.batches, "repeats": args.repeats}
    for name, settings in configs.items():
        report[name] = configuration(args.model, data, settings, args.repeats)
        print(f"{name}: forward {report[name]['forward']['seconds']:.3f} s, mask {report[name]['mask']['seconds']:.3f} s "
              f"({report[name]['mask_x_forward']:.2f}x), peak {report[name]['mask']['peak_cuda_mb']:.0f} MB", flush=True)
    reference = torch.tensor(report["float32"]["head_fisher"])
    for name in configs:
        values = torch.tensor(report[name].pop("head_fisher"))
        report[name]["head_vs_float32"] = {"spearman": spearman(values, reference),
                                           "max_rel_diff": float((values - reference).abs().max() / reference.abs().max())}
    report["bf16_over_fp32_time"] = report["bfloat16"]["mask"]["seconds"] / report["float32"]["mask"]["seconds"]
    (args.out / "llm_scale.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
