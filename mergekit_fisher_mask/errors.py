"""Exceptions raised for bad user input; each message says what, where, what was expected and how to fix it."""


class FisherMaskError(ValueError):
    """Base class for every user-facing error of this package."""


class UnsupportedArchitectureError(FisherMaskError):
    """A model's ``model_type`` has no entry in the architecture table."""


class FisherFileError(FisherMaskError):
    """A Fisher file is corrupt, of the wrong format, or does not match the model it is used with."""


class CalibrationDataError(FisherMaskError):
    """Calibration data is missing, empty, or lacks a required column."""


class RecipeError(FisherMaskError):
    """A merge recipe is malformed or inconsistent with the models it names."""
