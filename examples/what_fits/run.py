"""What fits where: a cost model of calibration memory, checked against runs on this machine, and the table it gives.

    python examples/what_fits/run.py [--cache examples/.cache] [--skip-measure]

The model (all sizes in bytes, ``b`` the bytes of the load dtype, ``T`` tokens in a micro-batch):

* process: ``base`` (Python, torch, transformers: 0.47 GB measured here; a CUDA context adds about 1.5 GB per GPU);
* weights: ``P * b`` where they are resident; while loading, the checkpoint's file is mapped as well;
* activations kept for backward, per token: ``L * (6h + 4I) * b`` in memory, or ``L * h * b + (6h + 4I) * b``
  under activation checkpointing (only each layer's input, plus one layer while it is recomputed);
* the LM loss: one 64 MiB chunk of float32 logits and a float32 ``(T, h)`` gradient;
* an offloaded layer: its weights, loaded for each use (``P_layer * b``, plus the stored copy if it is converted);
* measured RSS also counts the pages of the memory-mapped checkpoint that were read (reclaimable page cache).

``--skip-measure`` prints only the table. Results: ``examples/what_fits/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GB = 1e9
BASE = 0.47 * GB  # measured: Python + torch + transformers + this package, before loading a model
CUDA_CONTEXT = 1.5 * GB
LOGITS_CHUNK = 64 * 2**20


@dataclass(frozen=True)
class Shape:
    name: str
    params: float
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @property
    def per_layer(self) -> float:
        return (self.params - 2 * self.vocab * self.hidden) / self.layers


# Published configurations (Llama 3.x, Llama 2, Code Llama); parameter counts include embeddings and LM head.
MODELS = [
    Shape("1B (Llama-3.2-1B)", 1.24e9, 16, 2048, 8192, 128256),
    Shape("3B (Llama-3.2-3B)", 3.21e9, 28, 3072, 8192, 128256),
    Shape("8B (Llama-3.1-8B)", 8.03e9, 32, 4096, 14336, 128256),
    Shape("13B (Llama-2-13B)", 13.0e9, 40, 5120, 13824, 32000),
    Shape("34B (CodeLlama-34B)", 33.7e9, 48, 8192, 22016, 32000),
    Shape("70B (Llama-3.1-70B)", 70.6e9, 80, 8192, 28672, 128256),
]


def activations(shape: Shape, tokens: int, dtype_bytes: int, checkpointing: bool) -> float:
    layer = (6 * shape.hidden + 4 * shape.intermediate) * dtype_bytes
    per_token = shape.layers * shape.hidden * dtype_bytes + layer if checkpointing else shape.layers * layer
    return tokens * (per_token + 4 * shape.hidden) + LOGITS_CHUNK


def in_memory(shape: Shape, tokens: int, dtype_bytes: int, gpus: int = 0) -> float:
    """Peak bytes on one device (the whole model on it), or per GPU when spread over ``gpus`` GPUs."""
    if gpus <= 1:
        return shape.params * dtype_bytes + activations(shape, tokens, dtype_bytes, False)
    return shape.params * dtype_bytes / gpus + activations(shape, tokens, dtype_bytes, True) + CUDA_CONTEXT


def offloaded(shape: Shape, tokens: int, dtype_bytes: int, resident: float) -> float:
    """Peak bytes on the execution device with ``resident`` bytes of layers kept there and the rest offloaded."""
    return resident + 2 * shape.per_layer * dtype_bytes + activations(shape, tokens, dtype_bytes, True)


def table(tokens: int) -> list:
    """For each model and machine, the simplest placement that fits (None: does not fit)."""
    rows = []
    for shape in MODELS:
        cpu_ram = 24 * GB * 0.9
        row = {"model": shape.name}
        for key, dtype_bytes in (("cpu24_fp32", 4), ("cpu24_bf16", 2)):
            if BASE + in_memory(shape, tokens, dtype_bytes) <= cpu_ram:  # mapped checkpoint pages are reclaimable
                row[key] = "in memory"
            else:
                row[key] = "disk offload"  # one layer at a time: fits for every size listed
        gpu = 80 * GB * 0.95
        host = 0.5e12  # a typical GPU server's RAM (an assumption, not measured)
        if in_memory(shape, tokens, 2) + CUDA_CONTEXT <= gpu:
            row["gpu80"] = "in memory"
        elif shape.params * 2 <= host:
            row["gpu80"] = "CPU offload"
        else:
            row["gpu80"] = "disk offload"
        needed = next((g for g in (1, 2, 4, 8) if in_memory(shape, tokens, 2, g) + (CUDA_CONTEXT if g == 1 else 0) <= gpu), None)
        row["node8x80"] = "in memory (1 GPU)" if needed == 1 else f"{needed} GPUs" if needed else "CPU offload"
        row["weights_bf16_gb"] = round(shape.params * 2 / GB, 1)
        rows.append(row)
    return rows


def peak_rss(command) -> dict:
    """Run ``command`` and return its exit code, wall time and peak RSS (resource usage of the child)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    return {"returncode": os.waitstatus_to_exitcode(status), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 3), "stderr_tail": err.strip().splitlines()[-1:]}


def checks(cache: Path) -> list:
    """Predicted against measured peak memory for runs that fit on this machine."""
    import assets

    smollm2 = assets.smollm2_path(cache)
    smol = Shape("SmolLM2-135M", 134.5e6, 30, 576, 1536, 49152)
    big = cache / "memory_limit" / "llama-453m-bf16"
    big_shape = Shape("Llama 453M (examples/memory_limit)", 453e6, 16, 1536, 4096, 320)
    text = cache / "text" / "austen_train.txt"
    runs = []
    calibrate = [sys.executable, "-m", "mergekit_fisher_mask", "calibrate", "--quiet", "--overwrite"]
    work = cache / "what_fits"
    work.mkdir(parents=True, exist_ok=True)
    # Measured RSS also counts the pages of the memory-mapped safetensors file that were read (reclaimable).
    smol_file, big_file = smol.params * 4, big_shape.params * 2
    # SmolLM2, fp32 checkpoint, 32 x 128 tokens in batches of 32: automatic micro-batches of 7 (1 GiB budget).
    runs.append(("SmolLM2-135M, float32, in memory, batch 32 x 128 (micro-batches of 7)",
                 BASE + in_memory(smol, 7 * 128, 4) + smol_file,
                 calibrate + [str(smollm2), "--data", str(text), "--samples", "32", "--batch-size", "32",
                              "--max-length", "128", "--dtype", "float32", "--out", str(work / "a.safetensors")]))
    runs.append(("SmolLM2-135M, bfloat16, in memory, batch 8 x 128",
                 BASE + in_memory(smol, 8 * 128, 2) + smol_file,
                 calibrate + [str(smollm2), "--data", str(text), "--samples", "8", "--batch-size", "8",
                              "--max-length", "128", "--dtype", "bfloat16", "--out", str(work / "b.safetensors")]))
    if (big / "config.json").exists():
        data = cache / "memory_limit" / "data.jsonl"
        runs.append(("Llama 453M, bf16 checkpoint loaded in float32, in memory, 4 x 64",
                     BASE + in_memory(big_shape, 4 * 64, 4) + big_file,
                     calibrate + [str(big), "--data", str(data), "--samples", "8", "--batch-size", "4",
                                  "--max-length", "64", "--dtype", "float32", "--out", str(work / "c.safetensors")]))
        runs.append(("Llama 453M, float32, disk offload with cpu=300MB, 4 x 64",
                     BASE + offloaded(big_shape, 4 * 64, 4, 300e6) + big_file,
                     calibrate + [str(big), "--data", str(data), "--samples", "8", "--batch-size", "4",
                                  "--max-length", "64", "--dtype", "float32", "--device-map", "auto",
                                  "--max-memory", "cpu=300MB", "--offload-folder", str(work / "off"),
                                  "--out", str(work / "d.safetensors")]))
    results = []
    for name, predicted, command in runs:
        measured = peak_rss(command)
        results.append({"run": name, "predicted_gb": round(predicted / GB, 2), **measured})
        print(f"{name}: predicted {predicted / GB:.2f} GB, measured {measured['peak_rss_gb']:.2f} GB", flush=True)
    return results


def main() -> int:
    import assets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=assets.DEFAULT_CACHE)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per micro-batch assumed in the table")
    parser.add_argument("--skip-measure", action="store_true")
    args = parser.parse_args()
    report = {"tokens_per_micro_batch": args.tokens, "table": table(args.tokens)}
    if not args.skip_measure:
        report["checks"] = checks(args.cache.resolve())
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "results.json").write_text(json.dumps(report, indent=2))
    lines = ["| model | bf16 weights | 24 GB CPU machine, float32 | 24 GB CPU machine, bfloat16 | one 80 GB GPU | 8 x 80 GB GPUs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['weights_bf16_gb']} GB | {r['cpu24_fp32']} | {r['cpu24_bf16']} | {r['gpu80']} | "
              f"{r['node8x80']} |" for r in report["table"]]
    if "checks" in report:
        lines += ["", "| run on this machine | predicted peak GB | measured peak RSS GB |", "|---|---|---|"]
        lines += [f"| {c['run']} | {c['predicted_gb']} | {c['peak_rss_gb']} |" for c in report["checks"]]
    (results / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
