"""Exceptions raised for bad user input; each message says what, where, what was expected and how to fix it.

Every class derives from :class:`FisherMaskError`, which the command line prints as one line (exit code 2). Bugs of
ours raise anything else and keep their traceback.
"""


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
