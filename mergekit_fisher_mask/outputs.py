"""Writing outputs without ever destroying what the user owns.

Rules, enforced here for every file and folder this tool writes:

* an output never equals, contains or lies inside an input (a model folder, a Fisher file's folder, ...);
* an existing output is replaced only if this tool wrote it (the caller says how to recognise that) and only with
  ``--overwrite``; anything else is refused, naming what is there;
* results are written under a hidden sibling name (``.<name>.partial-<host>-<pid>-<random>``) and renamed into
  place when complete, so an interrupted run never leaves something that looks finished. Such leftovers of a run
  that died are removed by the next run into the same path; those of a run still alive are left alone;
* the check is made before any work and made again just before the result is moved into place, so something that
  appeared at the output path meanwhile (a user's folder, another run's result) is not replaced either.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from .errors import OutputPathError

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _resolved(path) -> Path:
    """The absolute path with every symbolic link resolved, so that no alias of an input looks like another path."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _final(path) -> Path:
    """Where a result goes: the real parent folder, and the name itself (a link there is replaced, not followed)."""
    path = Path(os.path.expanduser(str(path)))
    return _resolved(path.parent) / path.name


def check_no_overlap(out, inputs: Mapping[str, Path], *, option: str = "output") -> None:
    """Refuse ``out`` if it equals, contains or lies inside any input path (``{description: path}``)."""
    target = _resolved(out)
    for description, path in inputs.items():
        other = _resolved(path)
        if target == other:
            relation = "is"
        elif other in target.parents:
            relation = "lies inside"
        elif target in other.parents:
            relation = "contains"
        else:
            continue
        raise OutputPathError(
            f"The {option} {out} {relation} {description} {path}; writing there could replace or delete it. "
            "Choose a path outside every input."
        )


def describe_names(names, limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 3 more``."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe_contents(folder: Path, limit: int = 5) -> str:
    return describe_names(sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()), limit)


@dataclass(frozen=True)
class OutputClaim:
    """What :func:`check_replaceable` allowed, so that the same check runs again just before publishing."""

    out: Path
    overwrite: bool
    is_ours: Callable[[Path], bool]
    what: str
    folder: bool
    option: str

    def check(self) -> None:
        try:
            check_replaceable(self.out, overwrite=self.overwrite, is_ours=self.is_ours, what=self.what,
                              folder=self.folder, option=self.option)
        except OutputPathError as error:
            raise OutputPathError(f"While this run was working, something appeared at {self.out}: {error}") from None


def check_replaceable(
    out, *, overwrite: bool, is_ours: Callable[[Path], bool], what: str, folder: bool, option: str = "output"
) -> OutputClaim:
    """Allow writing ``out`` only if it is absent or empty, or if it is ``what`` (``is_ours``) and ``overwrite``.

    ``folder`` says whether the output is a folder (a merge, a full Fisher) or a single file (a mask Fisher). Returns
    the claim to hand to :func:`publish` / :func:`staged_file`, which repeat the check right before replacing.
    """
    path = Path(out)
    claim = OutputClaim(path, overwrite, is_ours, what, folder, option)
    parent = next((p for p in _resolved(path).parents if os.path.lexists(p)), None)
    if parent is not None and not parent.is_dir():
        raise OutputPathError(f"The {option} {path} cannot be created: {parent} is a file, not a folder.")
    if not os.path.lexists(path):
        return claim
    if path.is_symlink():
        raise OutputPathError(f"The {option} {path} is a symbolic link; refusing to write through it. Remove it first.")
    if folder and path.is_file():
        raise OutputPathError(f"The {option} {path} is a file; a folder was expected. Choose another path.")
    if not folder and path.is_dir():
        raise OutputPathError(
            f"The {option} {path} is a folder; give the path of the file to write, e.g. {path / 'model.fisher.safetensors'}."
        )
    if folder and not any(path.iterdir()):
        return claim
    if not is_ours(path):
        held = f"holds files this tool did not write ({describe_contents(path)})" if folder else "is not " + what
        raise OutputPathError(
            f"The {option} {path} already exists and {held}; refusing to replace it. Choose another path, or move it "
            "away yourself."
        )
    if not overwrite:
        raise OutputPathError(f"The {option} {path} already holds {what}. Pass --overwrite to replace it.")
    return claim


def is_png(path: Path) -> bool:
    """Whether ``path`` is a PNG image (what ``inspect --plot`` may replace)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _staging_pattern(out: Path) -> "re.Pattern[str]":
    return re.compile(rf"\.{re.escape(out.name)}\.(?:partial|replaced)-([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}")


def _staging_name(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(out) -> int:
    """Delete leftovers of earlier runs into ``out`` whose process has died on this host; return how many."""
    out = _final(out)
    if not out.parent.is_dir():
        return 0
    pattern, removed = _staging_pattern(out), 0
    for sibling in out.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match is None or match.group(1) != _HOST or _alive(int(match.group(2))):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed += 1
    return removed


def _make_public(path: Path) -> None:
    """Give staged files the permissions any saved model has (mkstemp and mkdtemp create private ones)."""
    umask = os.umask(0)
    os.umask(umask)
    if path.is_dir():
        os.chmod(path, 0o777 & ~umask)
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


def _replace(staged: Path, out: Path, claim: Optional[OutputClaim]) -> None:
    """Move ``staged`` to ``out``; an existing ``out`` (checked again here to be ours) is removed only afterwards."""
    if claim is not None:
        claim.check()
    _make_public(staged)
    if out.is_dir():
        previous = _staging_name(out, "replaced")
        os.replace(out, previous)
        os.replace(staged, out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staged, out)


def _new_staging(out) -> Path:
    """A fresh hidden sibling name for ``out``, after removing dead runs' leftovers."""
    out = _final(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    return _staging_name(out, "partial")


@contextlib.contextmanager
def staged_folder(out) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success the caller's :func:`publish` moves it to ``out``."""
    staging = _new_staging(out)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a no-op once published


@contextlib.contextmanager
def staged_file(out, claim: Optional[OutputClaim] = None) -> Iterator[Path]:
    """Yield a hidden sibling path to write one file to; it replaces ``out`` when the block ends without error (after
    ``claim`` is checked again)."""
    staging = _new_staging(out)
    try:
        yield staging
        _replace(staging, _final(out), claim)
    finally:
        staging.unlink(missing_ok=True)


def publish(staging: Path, out, claim: Optional[OutputClaim] = None) -> None:
    """Move a finished staged folder into place, replacing an existing output (``claim`` is checked again first)."""
    _replace(staging, _final(out), claim)

