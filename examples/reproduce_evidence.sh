#!/usr/bin/env bash
# Rebuild the README's evidence from the registries on a fresh machine: the paper's protocol on four real
# classification tasks (MiniLM), the 3-seed merge grid on the same tasks, then the LLM domain merges (SmolLM2 on
# three domains, Gemma-3-270M on two). Every step is cached; a re-run skips
# finished work. Benchmarks are separate: python examples/benchmarks/run.py
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[examples]"
python examples/paper_protocol/run.py "$@"
python examples/merge_grid/run.py
python examples/llm_domains/run.py
GEMMA3_LLM_DOMAINS_ARGS
