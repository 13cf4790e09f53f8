"""A model whose float32 copy exceeds a hard memory limit: the in-memory pass is killed, disk offload succeeds.

Runs ``examples/memory_limit/run.py`` (a 453M-parameter Llama stored in bf16, a 1.5 GB cgroup) where a cgroup v1
memory controller can be written (root); about 30 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "memory_limit" / "run.py"
CGROUP = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(
    not (CGROUP.is_dir() and os.access(CGROUP, os.W_OK)), reason="needs a writable cgroup v1 memory controller (root)"
)
def test_offload_fits_where_the_in_memory_pass_is_killed(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")],
        capture_output=True, text=True,
    )
    report = json.loads((tmp_path / "results" / "results.json").read_text())
    assert report["in_memory_limited"]["returncode"] == -9, "the limit binds: the in-memory pass is killed"
    assert report["offloaded_limited"]["returncode"] == 0, result.stdout[-2000:]
    assert report["offloaded_limited"]["cgroup_peak_mb"] <= report["limit_mb"]
    assert max(report["offloaded_vs_reference_max_rel_diff"].values()) < 1e-5
    assert result.returncode == 0
