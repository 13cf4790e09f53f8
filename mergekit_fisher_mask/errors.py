"""Exceptions raised for bad user input; each message says what, where, what was expected and how to fix it.

Every class derives from :class:`FisherMaskError`, which the command line prints as one line (exit code 2). Bugs of
ours raise anything else and keep their traceback.
"""

import contextlib
from contextvars import ContextVar
from typing import Iterator


class FisherMaskError(ValueError):
    """Base class for every user-facing error of this package."""


class UnsupportedArchitectureError(FisherMaskError):
    """A model's ``model_type`` has no entry in the architecture table."""


class FisherFileError(FisherMaskError):
    """A Fisher file is corrupt, of the wrong format, or does not match the model it is used with."""


class CalibrationDataError(FisherMaskError):
    """Calibration data is missing, empty, unreadable, or lacks a required column or valid labels."""


class RecipeError(FisherMaskError):
    """A merge recipe is malformed or inconsistent with the models it names."""


class SettingsError(FisherMaskError):
    """A calibration setting has an invalid value."""


class ModelLoadError(FisherMaskError):
    """A model folder or Hub id cannot be read: no config, corrupt or unreadable weights."""


class OutputPathError(FisherMaskError):
    """An output path would overwrite or delete something this tool did not write, or an input."""


# How messages name an option: the command line says ``--overwrite``, the Python API ``overwrite=True``. The CLI
# sets this for the duration of a command (:func:`command_line`); everything else is a Python call.
_ON_COMMAND_LINE: ContextVar[bool] = ContextVar("on_command_line", default=False)
# Python parameter -> command-line spelling, where the two differ.
_CLI_NAMES = {"cache_dir": "--fisher-cache", "output": "OUT_PATH", "task_heads": "--task-heads"}


@contextlib.contextmanager
def _spelling(on_command_line: bool) -> Iterator[None]:
    token = _ON_COMMAND_LINE.set(on_command_line)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def command_line():
    """Within the block, messages spell options as the command line does."""
    return _spelling(True)


def recipe_keys():
    """Within the block, messages spell settings as a recipe does (``max_length``), even under the command line."""
    return _spelling(False)


def option(name: str) -> str:
    """The option ``name`` (a Python parameter name) as the user spelled it: ``--max-length`` or ``max_length``."""
    if _ON_COMMAND_LINE.get():
        return _CLI_NAMES.get(name, "--" + name.replace("_", "-"))
    return name


# Python parameter -> what a message calls the thing it names, where that reads better than the parameter itself.
_API_SUBJECTS = {"out": "output", "gram_out": "Gram output", "cache_dir": "calibration cache", "offload_folder": "offload folder"}


def subject(name: str) -> str:
    """The path option ``name`` as the subject of a message: ``--out`` on the command line, ``output`` in Python."""
    return option(name) if _ON_COMMAND_LINE.get() else _API_SUBJECTS.get(name, name.replace("_", " "))


def flag(name: str) -> str:
    """A switch the user turns on: ``--overwrite`` on the command line, ``overwrite=True`` in Python."""
    return option(name) if _ON_COMMAND_LINE.get() else f"{name}=True"
