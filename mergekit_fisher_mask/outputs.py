"""Everything this tool writes goes through this module, and nothing it writes destroys what the user owns.

Rules, enforced here for every file and folder this tool writes:

* an output never equals, contains or lies inside an input (a model folder, a Fisher file, the data, ...), and a
  folder output is never a current working directory (replacing it would leave a shell in a deleted folder);
* an existing output is replaced only if this tool wrote it (its :class:`OutputKind` says how to recognise that)
  and only when the user asked to overwrite; anything else is refused, naming what is there. A folder this tool
  wrote lists its files (a manifest), so a file the user added later makes the folder theirs too;
* before any work, the output's folder must take a file and have room for the expected size;
* results are written under a hidden sibling name (``.<name>.partial-<host>-<pid>-<random>``) and renamed into
  place when complete, so an interrupted run never leaves something that looks finished. Leftovers of a run that
  died are removed by the next run into the same path; those of a run still alive are left alone;
* the check is made before any work and again just before the result is moved into place, so something that
  appeared at the output path meanwhile (a user's folder, another run's result) is not replaced either;
* a full, read-only or forbidden disk at write time is one :class:`OutputPathError` naming the path and the cause,
  with nothing left behind.

No other module of the package opens a file for writing, renames or deletes one (``tests/test_structure.py``).
Paths arrive here already resolved once by :func:`mergekit_fisher_mask.paths.user_path`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional

from .errors import OutputPathError, flag, subject

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
MARKER = "fisher_merge.json"  # written last into a merge: its presence and file list vouch for the folder


def _resolved(path) -> Path:
    """The absolute path with every symbolic link resolved, so that no alias of an input looks like another path."""
    return Path(os.path.realpath(path))


def _final(path) -> Path:
    """Where a result goes: the real parent folder, and the name itself (a link there is replaced, not followed)."""
    path = Path(path)
    return _resolved(path.parent) / path.name


def describe_names(names, limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 3 more``."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _describe_contents(folder: Path, limit: int = 5) -> str:
    return describe_names(sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()), limit)


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


# --------------------------------------------------------------------------------------------------------------
# What is at an output path, and whether this tool wrote it
# --------------------------------------------------------------------------------------------------------------


def written_files(folder: Path) -> List[str]:
    """Every file under ``folder``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if not p.is_dir())


_HASHED_UP_TO = 16 << 20  # files of a merge up to this size are recorded with their SHA-256, larger ones by size


def file_record(path: Path) -> Dict[str, object]:
    """What a manifest records about a file this tool wrote, to tell later whether the user changed it."""
    size = path.stat().st_size
    record: Dict[str, object] = {"size": size}
    if size <= _HASHED_UP_TO:
        record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return record


CHANGED = " (changed since this tool wrote it)"  # marks a listed file the user edited


def _changed(path: Path, recorded: Optional[Mapping]) -> bool:
    """Whether a listed file differs from what its manifest recorded (unknown: unchanged)."""
    if not recorded:
        return False
    try:
        if path.stat().st_size != recorded.get("size"):
            return True
        return "sha256" in recorded and hashlib.sha256(path.read_bytes()).hexdigest() != recorded["sha256"]
    except OSError:  # gone or unreadable since it was listed: not the file this tool wrote
        return True


@dataclass(frozen=True)
class OutputKind:
    """A kind of output this tool writes, and how to recognise one it wrote.

    ``listed(path)`` returns the files this tool wrote there, from the output's own manifest (``None``: no manifest,
    so nothing there is vouched for), each with what the manifest recorded about it (its size and hash, or None). A
    single file's ``listed`` returns ``{""}`` when the file is this tool's.
    """

    what: str  # "a previous merge", "a mask-Fisher file", ...
    folder: bool
    listed: Callable[[Path], Optional[Mapping]]

    def foreign(self, path: Path) -> Optional[List[str]]:
        """Files in a folder output that its manifest does not list, or that changed since it was written (marked
        "(changed)"); None if it has no manifest."""
        listed = self.listed(path)
        if listed is None:
            return None
        found = []
        for name in written_files(path):
            if name not in listed:
                found.append(name)
            elif isinstance(listed, Mapping) and _changed(Path(path) / name, listed[name]):
                found.append(name + CHANGED)
        return found

    def is_ours(self, path: Path) -> bool:
        """Whether ``path`` is such an output, written by this tool and holding nothing the user added."""
        if not self.folder:
            return self.listed(path) is not None
        return Path(path).is_dir() and self.foreign(path) == []


def _merge_manifest(folder: Path) -> Optional[Mapping]:
    """The files a merge's marker lists: ``{name: {size, sha256}}`` (0.3), or names only (0.2's list)."""
    try:
        files = json.loads((Path(folder) / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):  # no marker, or one that is not ours
        return None
    if isinstance(files, dict) and all(isinstance(v, dict) for v in files.values()):
        return {**files, MARKER: None}
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return dict.fromkeys([*files, MARKER])
    return None


def _png(path: Path) -> Optional[set]:
    try:
        with open(path, "rb") as handle:
            return {""} if handle.read(8) == b"\x89PNG\r\n\x1a\n" else None
    except OSError:
        return None


MERGE_OUTPUT = OutputKind("a previous merge", folder=True, listed=_merge_manifest)
PNG_IMAGE = OutputKind("a PNG image", folder=False, listed=_png)


def foreign_files(folder: Path) -> List[str]:
    """Files in a merge output that the merge did not write (every file if it has no marker)."""
    found = MERGE_OUTPUT.foreign(Path(folder))
    return found if found is not None else written_files(folder)


def is_merge_output(folder: Path) -> bool:
    """Whether ``folder`` is a finished merge of this tool that holds nothing the user added."""
    return MERGE_OUTPUT.is_ours(Path(folder))


# --------------------------------------------------------------------------------------------------------------
# Checks made before any work
# --------------------------------------------------------------------------------------------------------------


def check_no_overlap(out, inputs: Mapping[str, Path], *, name: str = "output", may_contain: bool = False) -> None:
    """Refuse ``out`` if it equals, contains (unless ``may_contain``) or lies inside any input path
    (``{description: path}``). ``name`` is the option that gave ``out`` (a Python parameter name; messages spell it
    as the user did)."""
    target = _resolved(out)
    for description, path in inputs.items():
        other = _resolved(path)
        if target == other:
            relation = "is"
        elif other in target.parents:
            relation = "lies inside"
        elif target in other.parents and not may_contain:
            relation = "contains"
        else:
            continue
        raise OutputPathError(
            f"The {subject(name)} {out} {relation} {description} {path}; writing there could replace or delete it. "
            "Choose a path outside every input."
        )


def _working_directories() -> Dict[int, Path]:
    """pid -> current folder of every process whose /proc entry this user may read (Linux), this one included."""
    found = {os.getpid(): Path.cwd()}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry.name)] = Path(os.readlink(entry / "cwd"))
    return found


def _process_name(pid: int) -> str:
    if pid == os.getpid():
        return "this command"
    try:
        return f"process {pid} ({Path(f'/proc/{pid}/comm').read_text().strip()})"
    except OSError:
        return f"process {pid}"


def check_not_a_working_directory(out, *, name: str = "output") -> None:
    """Refuse to replace a folder that is, or holds, a process's current folder (``.``, or a shell's folder): the
    replacement would leave that process in a deleted folder."""
    target = _resolved(out)
    if not target.is_dir():
        return
    for pid, cwd in sorted(_working_directories().items(), key=lambda item: item[0] != os.getpid()):
        cwd = _resolved(cwd)
        if cwd == target or target in cwd.parents:
            where = "the current folder of" if cwd == target else "a folder above the current folder of"
            raise OutputPathError(
                f"The {subject(name)} {out} is {where} {_process_name(pid)}; replacing it would leave that process "
                "in a deleted folder. Choose another path (e.g. a new folder inside it)."
            )


def _nearest_existing(path: Path) -> Path:
    return next(p for p in [path, *path.parents] if os.path.lexists(p))


def check_writable(out, *, name: str = "output", needed_bytes: Optional[int] = None, is_folder: bool = False) -> None:
    """Refuse before any work if the folder that will hold ``out`` (``out`` itself when ``is_folder``: a folder that
    receives files) cannot take a file (read-only, no permission, no inodes), or has less free space than
    ``needed_bytes``."""
    final = _final(out)
    folder = _nearest_existing(final if is_folder else final.parent)
    if not folder.is_dir():
        raise OutputPathError(f"The {subject(name)} {out} cannot be created: {folder} is a file, not a folder.")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{final.name}.probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OutputPathError(
            f"The {subject(name)} {out} cannot be written: {folder} does not take new files "
            f"({error.strerror or error}). Choose a writable location."
        ) from None
    if needed_bytes:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes:
            raise OutputPathError(
                f"The {subject(name)} {out} needs about {_size(needed_bytes)}, and {folder} has {_size(free)} free. "
                "Free some space or choose another location."
            )


@dataclass(frozen=True)
class OutputClaim:
    """What :func:`check_replaceable` allowed, so that the same check runs again just before publishing."""

    out: Path
    overwrite: bool
    kind: OutputKind
    name: str

    def check(self) -> None:
        try:
            check_replaceable(self.out, self.kind, overwrite=self.overwrite, name=self.name)
        except OutputPathError as error:
            raise OutputPathError(f"While this run was working, something appeared at {self.out}: {error}") from None


def check_replaceable(out, kind: OutputKind, *, overwrite: bool, name: str = "output") -> OutputClaim:
    """Allow writing ``out`` only if it is absent (or an empty folder), or if this tool wrote it as ``kind`` and the
    user passed ``overwrite``. Returns the claim to hand to :func:`publish` / :func:`staged_file`, which repeat the
    check right before replacing."""
    path = Path(out)
    claim = OutputClaim(path, overwrite, kind, name)
    spelled = subject(name)
    parent = _nearest_existing(_resolved(path).parent)
    if not parent.is_dir():
        raise OutputPathError(f"The {spelled} {path} cannot be created: {parent} is a file, not a folder.")
    if not os.path.lexists(path):
        return claim
    if path.is_symlink():
        raise OutputPathError(f"The {spelled} {path} is a symbolic link; refusing to write through it. Remove it first.")
    if kind.folder and not path.is_dir():
        raise OutputPathError(f"The {spelled} {path} is a file; a folder was expected. Choose another path.")
    if not kind.folder and path.is_dir():
        raise OutputPathError(
            f"The {spelled} {path} is a folder; give the path of the file to write, e.g. "
            f"{path / 'model.fisher.safetensors'}."
        )
    if kind.folder and not any(path.iterdir()):
        return claim
    if kind.folder:
        foreign = kind.foreign(path)
        if foreign is None:
            raise OutputPathError(
                f"The {spelled} {path} already exists and holds files this tool did not write "
                f"({_describe_contents(path)}); refusing to replace it. Choose another path, or move it away yourself."
            )
        if foreign:
            changed = any(name.endswith(CHANGED) for name in foreign)
            raise OutputPathError(
                f"The {spelled} {path} holds {kind.what} plus files this tool did not write"
                f"{' or that changed since' if changed else ''} ({describe_names(foreign)}); refusing to replace it. "
                "Move those files away, or choose another path."
            )
    elif not kind.is_ours(path):
        raise OutputPathError(
            f"The {spelled} {path} already exists and is not {kind.what}; refusing to replace it. Choose another "
            "path, or move it away yourself."
        )
    if not overwrite:
        raise OutputPathError(f"The {spelled} {path} already holds {kind.what}. Pass {flag('overwrite')} to replace it.")
    return claim


def claim_output(
    out,
    kind: OutputKind,
    *,
    overwrite: bool,
    inputs: Mapping[str, Path],
    name: str = "output",
    needed_bytes: Optional[int] = None,
) -> OutputClaim:
    """Every check an output gets before any work: not over an input, not a working directory, replaceable,
    writable with room to spare. Returns the claim that :func:`publish` / :func:`staged_file` check again."""
    check_no_overlap(out, inputs, name=name)
    claim = check_replaceable(out, kind, overwrite=overwrite, name=name)
    if kind.folder:
        check_not_a_working_directory(out, name=name)
    check_writable(out, name=name, needed_bytes=needed_bytes)
    return claim


# --------------------------------------------------------------------------------------------------------------
# Writing: staged, atomic, and with one clear error for a disk that refuses
# --------------------------------------------------------------------------------------------------------------

_DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _disk_errno(error: BaseException) -> Optional[int]:
    """The errno of a write that the disk refused: an OSError, or safetensors' error wrapping one."""
    if isinstance(error, OSError):
        return error.errno if error.errno in _DISK_ERRORS else None
    if type(error).__name__ == "SafetensorError":  # Rust's io::Error as text: "... (os error 28)" or "Os { code: 28"
        match = re.search(r"\bos error (\d+)|\bcode: (\d+)", str(error))
        code = int(next(filter(None, match.groups()))) if match else None
        if code in _DISK_ERRORS:
            return code
    return None


@contextlib.contextmanager
def disk_errors(target) -> Iterator[None]:
    """Within the block, a write the disk refuses (full, read-only, forbidden, over quota) becomes one
    :class:`OutputPathError` naming ``target`` and the cause."""
    try:
        yield
    except Exception as error:
        code = _disk_errno(error)
        if code is None:
            raise
        raise OutputPathError(
            f"Cannot write {target}: {os.strerror(code)}. Nothing was left there (an output it would have replaced "
            "is kept); free space or choose a writable location, then run again."
        ) from None


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


def _remove(path: Path) -> None:
    """Remove a file or folder this module made; a failure (read-only disk) leaves it, and is not an error."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
        _remove(sibling)
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
        _remove(previous)
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
    """Yield a hidden sibling folder to write into; on success the caller's :func:`publish` moves it to ``out``.
    A disk that refuses a write inside the block is reported as one error; the staging folder is always removed."""
    staging = None
    try:
        with disk_errors(out):
            staging = _new_staging(out)
            staging.mkdir()
            yield staging
    finally:
        if staging is not None:
            _remove(staging)  # a no-op once published


@contextlib.contextmanager
def staged_file(out, claim: Optional[OutputClaim] = None) -> Iterator[Path]:
    """Yield a hidden sibling path to write one file to; it replaces ``out`` when the block ends without error (after
    ``claim`` is checked again)."""
    staging = None
    try:
        with disk_errors(out):
            staging = _new_staging(out)
            yield staging
            _replace(staging, _final(out), claim)
    finally:
        if staging is not None:
            _remove(staging)


def publish(staging: Path, out, claim: Optional[OutputClaim] = None) -> None:
    """Move a finished staged folder into place, replacing an existing output (``claim`` is checked again first)."""
    with disk_errors(out):
        _replace(staging, _final(out), claim)


# The writers below write inside a staged output; the staging block reports a refused write, naming the output.


def write_text(path: Path, text: str) -> None:
    """Write a text file inside a staged output."""
    Path(path).write_text(text, encoding="utf-8")


def write_json(path: Path, value) -> None:
    """Write JSON (two-space indent, keys in the order given) inside a staged output."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_bytes(path: Path, data: bytes) -> None:
    Path(path).write_bytes(data)


def rename(old: Path, new: Path) -> None:
    """Rename a file inside a staged output."""
    os.replace(old, new)


def save_tensors(tensors, path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file whose header is byte-identical for identical inputs.

    safetensors writes its ``__metadata__`` map in no fixed order, so two calibrations of the same model and data
    would differ in their bytes. The header is rewritten in place with sorted keys: the same JSON, the same length.
    """
    from safetensors.torch import save_file

    save_file({name: value.contiguous() for name, value in tensors.items()}, str(path), metadata=metadata)
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) <= length:  # safetensors pads its header with spaces to an 8-byte boundary
            handle.seek(8)
            handle.write(canonical + b" " * (length - len(canonical)))


def save_figure(figure, path: Path, *, dpi: int) -> None:
    """Render a matplotlib figure as PNG into ``path`` (a staged file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format="png")
    write_bytes(path, buffer.getvalue())


def write_marker(staging: Path, record: dict) -> None:
    """Write the merge marker last: ``record`` plus every file the merge wrote, with its size (and SHA-256 up to
    16 MB), so that a later ``--overwrite`` can tell the user's edits and additions from the merge's files."""
    files = {name: file_record(staging / name) for name in written_files(staging)}
    write_json(staging / MARKER, {**record, "files": files})


def check_scratch_folder(folder, *, inputs: Mapping[str, Path], name: str) -> None:
    """Refuse, before any work, a folder given for scratch files (``--offload-folder``) that is a file, lies under a
    file, overlaps an input or the output, or cannot take files."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputPathError(f"The {subject(name)} {folder} is a file; give a folder (this run makes its own folder "
                              "inside it and removes it afterwards).")
    check_no_overlap(folder, inputs, name=name, may_contain=True)  # the run writes only a new folder of its own
    check_writable(folder, name=name, is_folder=True)


@contextlib.contextmanager
def private_folder(parent) -> Iterator[Path]:
    """A folder of this process's own inside the user's folder ``parent``, removed on exit; ``parent`` is created if
    it is missing and then removed too if it is left empty. The user's files in it are left alone."""
    parent = Path(parent)
    created = [p for p in [parent, *parent.parents] if not os.path.lexists(p)]
    with disk_errors(parent):
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="mergekit-fisher-offload-", dir=parent))
    try:
        yield folder
    finally:
        _remove(folder)
        for made in created:  # innermost first; only folders this call made, and only if empty
            with contextlib.suppress(OSError):
                made.rmdir()
