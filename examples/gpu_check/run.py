"""GPU check: calibrate MiniLM and SmolLM2 with bf16 mixed precision on CUDA, and merge with --cuda.

Run on a machine with a GPU, from the repository root, with the real models prepared by the other examples:

    python examples/gpu_check/run.py --minilm DIR --smollm2 DIR --minilm-data FILE --lm-data FILE --out DIR

Reports, per model, the pass times of forward / mask Fisher (fp32 and bf16) / full Fisher, the peak CUDA memory,
how close the bf16 mask Fisher is to the fp32 one (relative error, Spearman rank correlation of head Fisher), and
the wall time of `mergekit-fisher merge --cuda` for `linear` and `fisher_mask` on SmolLM2 and a perturbed copy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mergekit_fisher_mask import (
    CalibrationSettings,
    compute_full_fisher,
    compute_mask_fisher,
    model_inputs,
    prepare_calibration,
)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def timed(fn):
    cuda = torch.cuda.is_available()  # False only in a --dry-run on CPU
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0


def passes(model: str, data: str, batch: int, length: int, samples: int, chunk: int) -> dict:
    settings = CalibrationSettings(samples=samples, batch_size=batch, max_length=length)
    run = prepare_calibration(model, data, settings, None)
    report = {"device": str(run.accelerator.device)}

    def forward():
        with torch.inference_mode():
            for b in run.loader:
                run.model(**model_inputs(b))

    def mask(precision):
        groups, _ = compute_mask_fisher(run.model, run.loader, accelerator=run.accelerator, progress=False,
                                        mixed_precision=precision)
        return groups["head_fisher"], groups["ffn_fisher"]

    forward()  # warm-up: CUDA context, kernels, allocator
    _, report["forward_s"], report["forward_peak_cuda_mb"] = timed(forward)
    fp32, report["mask_fp32_s"], report["mask_fp32_peak_cuda_mb"] = timed(lambda: mask("no"))
    bf16, report["mask_bf16_s"], report["mask_bf16_peak_cuda_mb"] = timed(lambda: mask("bf16"))
    report["mask_fp32_x_forward"] = report["mask_fp32_s"] / report["forward_s"]
    report["mask_bf16_x_forward"] = report["mask_bf16_s"] / report["forward_s"]
    report["bf16_vs_fp32_head_rel_error"] = float((bf16[0] - fp32[0]).abs().max() / fp32[0].abs().max())
    report["bf16_vs_fp32_head_spearman"] = spearman(bf16[0], fp32[0])
    report["bf16_vs_fp32_ffn_spearman"] = spearman(bf16[1], fp32[1])
    eager = prepare_calibration(model, data, settings, None, attn_implementation="eager")
    _, report["full_fp32_s"], report["full_peak_cuda_mb"] = timed(
        lambda: compute_full_fisher(eager.model, eager.loader, accelerator=eager.accelerator, chunk_size=chunk,
                                    progress=False))
    report["full_x_forward"] = report["full_fp32_s"] / report["forward_s"]
    print(json.dumps(report), flush=True)
    return report


def perturbed_copy(source: Path, target: Path, scale: float = 0.02) -> Path:
    """A second 'fine-tune' for the merge timing: the model plus small Gaussian noise (seeded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def merge_times(models, data: str, work: Path) -> dict:
    import yaml

    fishers = []
    for i, model in enumerate(models):
        fishers.append(work / f"m{i}.fisher.safetensors")
        subprocess.run([sys.executable, "-m", "mergekit_fisher_mask", "calibrate", str(model), "--data", data,
                        "--out", str(fishers[-1]), "--samples", "32", "--batch-size", "32", "--max-length", "128",
                        "--mixed-precision", "bf16", "--quiet"], check=True)
    report = {}
    for method in ("linear", "fisher_mask", "linear", "fisher_mask"):  # second round: warm file cache
        entries = [{"model": str(m), "parameters": {"weight": 1.0, **({"fisher": str(f)} if method != "linear" else {})}}
                   for m, f in zip(models, fishers)]
        recipe = work / f"{method}.yml"
        recipe.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(models[0]), "models": entries,
                                          "dtype": "float32"}))
        start = time.perf_counter()
        device = ["--cuda"] if torch.cuda.is_available() else []
        subprocess.run([sys.executable, "-m", "mergekit_fisher_mask", "merge", str(recipe), str(work / f"out-{method}"),
                        *device, "--overwrite", "--quiet"], check=True)
        report[f"{method}_cuda_merge_s"] = time.perf_counter() - start
    print(json.dumps(report), flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minilm", required=True)
    parser.add_argument("--minilm-data", required=True)
    parser.add_argument("--smollm2", required=True)
    parser.add_argument("--lm-data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="allow a CPU run (to test this script itself)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("No CUDA device: this check is for a GPU machine.")
    work = Path("/tmp/gpu_check_work")  # models stay off $OUT, which only carries small files back
    args.out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (dry run)",
              "torch": torch.__version__}
    report["minilm"] = passes(args.minilm, args.minilm_data, 32, 64, 128, 8)
    report["smollm2"] = passes(args.smollm2, args.lm_data, 32, 128, 32, 4)
    copy = perturbed_copy(Path(args.smollm2), work / "smollm2-perturbed")
    report["merge_smollm2"] = merge_times([Path(args.smollm2), copy], args.lm_data, work)
    (args.out / "gpu_results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
