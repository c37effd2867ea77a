"""Errors of the conversion pipeline; the CLI reports them as one line, without a traceback."""


class ConversionError(Exception):
    """Bad input (unsupported checkpoint, missing data, inconsistent options) or a run that cannot continue."""


class NonFiniteLossError(ConversionError):
    """A NaN/inf loss or gradient stopped training; the last good checkpoint is kept."""
