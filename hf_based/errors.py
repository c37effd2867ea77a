"""The errors hf-based raises for bad input or a run that cannot continue.

Every one derives from `HfBasedError`; the `hf-based` command reports them as one line on stderr, without a traceback.
"""


class HfBasedError(Exception):
    """Base class: bad input named in one line, or a run that cannot continue."""


class UsageError(HfBasedError, ValueError):
    """An option or argument that cannot be used (a bad path, value or combination)."""


class ConversionError(HfBasedError):
    """Conversion input that cannot be used (unsupported checkpoint, missing data, inconsistent options)."""


class NonFiniteLossError(ConversionError):
    """A NaN/inf loss or gradient stopped training; the last good checkpoint is kept."""


class CheckpointError(HfBasedError, ValueError):
    """A source checkpoint that cannot be imported; the message names the file, key or setting."""


class UnknownTaskError(HfBasedError, ValueError):
    """An lm-eval task that is not known, or has no local data."""
