"""Calibrate a model whose float32 copy does not fit in memory: a hard cgroup limit, in memory vs disk offload.

    sudo python examples/memory_limit/run.py [--work DIR] [--limit 1500MB] [--cpu-budget 300MB] [--results DIR]

Needs root and cgroup v1 (``/sys/fs/cgroup/memory``). Steps:

1. build a random Llama (453M parameters) stored in bfloat16 (0.9 GB on disk, 1.8 GB in float32). A bf16 checkpoint
   is used because float32 safetensors are memory-mapped, so the kernel would page them in and out and even the
   in-memory pass would fit;
2. calibrate it in float32, in memory, without a limit: the reference (its peak RSS is reported);
3. the same inside a cgroup of ``--limit`` bytes: it must be killed, which shows the limit binds;
4. inside a fresh cgroup of the same size, ``--device-map auto --max-memory cpu=<budget> --offload-folder DIR``: it
   must succeed and equal the reference to float round-off.

Results go to ``examples/memory_limit/results/`` (``results.json``, ``results.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
WORDS = [f"w{i}" for i in range(40)]


def log(message: str) -> None:
    print(f"[memory_limit {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_model(folder: Path) -> Path:
    """A random Llama, saved in bfloat16 with a small byte-level BPE tokenizer; skipped if already built."""
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config = transformers.LlamaConfig(
        hidden_size=1536, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=12,
        intermediate_size=4096, vocab_size=320, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=259, special_tokens=["[PAD]", "[BOS]", "[EOS]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([" ".join(WORDS)], trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="[EOS]", bos_token="[BOS]").save_pretrained(folder)
    return folder


def write_data(path: Path, rows: int = 8) -> Path:
    import random

    generator = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(generator.choices(WORDS, k=48))}) + "\n" for _ in range(rows)))
    return path


def run(command, cgroup: Path = None) -> dict:
    """Run ``command`` (inside ``cgroup`` if given); return its exit status, wall time and peak RSS."""

    def join_cgroup():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    start = time.perf_counter()
    process = subprocess.Popen(command, preexec_fn=join_cgroup if cgroup else None, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    result = {
        "returncode": os.waitstatus_to_exitcode(status),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "output_tail": output.strip().splitlines()[-3:],
    }
    if cgroup:
        result["cgroup_peak_mb"] = round(int((cgroup / "memory.max_usage_in_bytes").read_text()) / 2**20)
        result["cgroup_failcnt"] = int((cgroup / "memory.failcnt").read_text())
    return result


def make_cgroup(name: str, limit: int) -> Path:
    group = CGROUP_ROOT / name
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE.parent / ".cache" / "memory_limit")
    parser.add_argument("--limit", default="1500MB", help="the cgroup's hard memory limit")
    parser.add_argument("--cpu-budget", default="300MB", help="--max-memory cpu=... for the offloaded run")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where results.json/.md go")
    args = parser.parse_args()
    from accelerate.utils import convert_file_size_to_int

    if os.geteuid() != 0 or not CGROUP_ROOT.is_dir():
        sys.exit("This script needs root and cgroup v1 (/sys/fs/cgroup/memory).")
    limit = convert_file_size_to_int(args.limit)
    args.work.mkdir(parents=True, exist_ok=True)
    log("building the bf16 model (cached)")
    model = build_model(args.work / "llama-453m-bf16")
    data = write_data(args.work / "data.jsonl")
    base = [sys.executable, "-m", "mergekit_fisher_mask", "calibrate", str(model), "--data", str(data),
            "--samples", "8", "--batch-size", "4", "--max-length", "64", "--dtype", "float32", "--quiet", "--overwrite"]
    outputs = {name: args.work / f"{name}.safetensors" for name in ("reference", "in_memory", "offloaded")}
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": "Llama, 453M parameters, stored bfloat16 (0.9 GB), calibrated in float32 (1.8 GB)",
        "limit_mb": round(limit / 2**20),
        "cpu_budget": args.cpu_budget,
    }
    log("1/3 in memory, no limit (reference)")
    report["reference"] = run(base + ["--out", str(outputs["reference"])])
    groups = []
    try:
        groups.append(make_cgroup(f"mfm-in-memory-{os.getpid()}", limit))
        log(f"2/3 in memory, limit {args.limit}: expected to be killed")
        report["in_memory_limited"] = run(base + ["--out", str(outputs["in_memory"])], groups[-1])
        groups.append(make_cgroup(f"mfm-offloaded-{os.getpid()}", limit))
        log(f"3/3 disk offload, limit {args.limit}, --max-memory cpu={args.cpu_budget}")
        offload = args.work / "offload"
        report["offloaded_limited"] = run(
            base + ["--out", str(outputs["offloaded"]), "--device-map", "auto", "--max-memory",
                    f"cpu={args.cpu_budget}", "--offload-folder", str(offload)], groups[-1])
    finally:
        for group in groups:
            try:
                group.rmdir()
            except OSError as error:
                log(f"could not remove cgroup {group}: {error}")
    from mergekit_fisher_mask import load_mask_fisher

    killed = report["in_memory_limited"]["returncode"] != 0
    succeeded = report["offloaded_limited"]["returncode"] == 0
    report["in_memory_killed"] = killed
    report["offloaded_succeeded"] = succeeded
    if succeeded:
        reference, offloaded = load_mask_fisher(outputs["reference"]), load_mask_fisher(outputs["offloaded"])
        report["offloaded_vs_reference_max_rel_diff"] = {
            name.removesuffix("_fisher"): float((offloaded.groups[name] - reference.groups[name]).abs().max()
                                                / reference.groups[name].abs().max())
            for name in ("head_fisher", "ffn_fisher")
        }
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(report, indent=2))
    rows = [("no limit, in memory", report["reference"]), (f"limit {args.limit}, in memory", report["in_memory_limited"]),
            (f"limit {args.limit}, disk offload (cpu={args.cpu_budget})", report["offloaded_limited"])]
    lines = [
        f"# Calibration under a hard memory limit ({report['machine']})", "", report["model"], "",
        "| run | exit code | wall s | peak RSS MB | cgroup peak MB |", "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['returncode']} | {r['seconds']} | {r['peak_rss_mb']} | {r.get('cgroup_peak_mb', '-')} |"
              for name, r in rows]
    if succeeded:
        diff = report["offloaded_vs_reference_max_rel_diff"]
        lines += ["", f"Offloaded vs reference, largest relative difference: head {diff['head']:.2e}, "
                  f"neurons {diff['ffn']:.2e}."]
    (results / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not (killed and succeeded):
        sys.exit("The limit did not bind, or the offloaded run failed: see results.json.")


if __name__ == "__main__":
    main()
