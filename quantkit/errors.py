"""User-facing errors.

Every mistake a user can make (a wrong path, a bad flag, a broken file) raises a
`QuantkitError` whose message names the input and the fix. The CLI prints it as one
line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class QuantkitError(Exception):
    """An error caused by the user's input or environment, not by a bug."""

    exit_code = 2


class CheckpointError(QuantkitError):
    """A model folder is missing, incomplete or not a checkpoint."""


class OutputError(QuantkitError):
    """The destination cannot be written (exists, unwritable, inside the source)."""


class ConfigError(QuantkitError):
    """A flag, recipe key or setting has a value quantkit cannot use."""


class CalibrationError(QuantkitError):
    """Calibration or evaluation text is missing, empty or too short."""


class QuantizationError(QuantkitError):
    """Quantization cannot proceed (NaN weights, Cholesky failing after retries, ...)."""


class DependencyError(QuantkitError):
    """An optional package is needed; the message names the extra to install."""


class NotAvailableError(QuantkitError):
    """A command that is part of the plan but not delivered yet."""


class HubError(QuantkitError):
    """An upload failed because of the network, the token or the remote side."""


def require(module_name: str, extra: str):
    """Import an optional dependency or explain which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise DependencyError(
            f"{module_name} is not installed: run `pip install 'quantkit[{extra}]'`"
        ) from exc
