"""The one exception hierarchy of lowbit.

Every user mistake raises a subclass of :class:`LowbitError` whose message says what was wrong
and what to do. The CLI prints it as a single line on stderr and exits non-zero; the Python API
lets it propagate so callers can catch the precise type.
"""


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class ConfigError(LowbitError, ValueError):
    """A configuration value or recipe key is invalid (bits out of range, unknown key, ...)."""


class CheckpointError(LowbitError):
    """A checkpoint or weights file is missing, corrupt, or does not match the model."""


class DataError(LowbitError):
    """A dataset path is wrong, a file is corrupt, or calibration data is empty / unusable."""


class ModelError(LowbitError):
    """A model cannot be built, imported, or has nothing quantizable."""


class NumericalError(LowbitError):
    """NaN or Inf found in weights or activations (the message names the layer)."""


class CalibrationError(LowbitError):
    """A quantizer was used before it was calibrated, or calibration could not run."""


class ExportError(LowbitError):
    """A model cannot be exported to a format (the message names the layer and the reason)."""
