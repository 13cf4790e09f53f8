"""User paths: turned into one absolute ``Path`` at the boundary, so that every check and every write use the same
object.

bash leaves ``~`` unexpanded after ``--out=`` and inside quotes, so the tool can receive ``~/mydata`` literally.
:func:`user_path` is the one place that expands it (as pip and huggingface-cli do); a check that looked at
``./~/mydata`` while the write went to ``$HOME/mydata`` is what this rules out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def user_path(value: PathLike) -> Path:
    """``value`` with ``~`` expanded, made absolute against the current folder; symbolic links are kept (whoever
    compares paths resolves them)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(value))))


def looks_local(text: str) -> bool:
    """Whether a model or data reference can only mean a local path (a Hub id is ``name`` or ``org/name``)."""
    return (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
        or (os.altsep is not None and os.altsep != "/" and os.altsep in text)
    )
