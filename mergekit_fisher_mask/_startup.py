"""Quiet Ctrl-C while the command line starts: torch, transformers and mergekit take seconds to import, and an
interrupt then would print a long ``KeyboardInterrupt`` traceback. Standard library only, so that it is in place
before any of them is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

INTERRUPTED = 130  # the shell's exit status for a process ended by SIGINT


def started_as_command() -> bool:
    """Whether this process is ``mergekit-fisher ...`` or ``python -m mergekit_fisher_mask ...`` (not a library user
    who imports the package, whose interrupts keep Python's usual behaviour)."""
    argv = getattr(sys, "orig_argv", sys.argv)
    script = os.path.basename(argv[1]) if len(argv) > 1 else ""
    return script == "mergekit-fisher" or argv[1:3] == ["-m", "mergekit_fisher_mask"]


@contextlib.contextmanager
def quiet_interrupts() -> Iterator[None]:
    """Within the block, Ctrl-C ends the command with one line and exit status 130 (only when started as the
    command; otherwise the interrupt propagates as usual)."""
    try:
        yield
    except KeyboardInterrupt:
        if not started_as_command():
            raise
        sys.stderr.write("Interrupted.\n")
        sys.exit(INTERRUPTED)
