"""User-facing errors: a one-line message (file, row, field, fix) that the CLI prints without a traceback."""


class SftflowError(ValueError):
    """Base of every error the user should see as one line; deterministic, so Prefect never retries it."""


class ConfigError(SftflowError):
    """The config file or an override is invalid."""


class InputError(SftflowError):
    """A source file is missing or malformed; the message names the file, the line and the field."""


class DataValidationError(SftflowError):
    """A Great Expectations suite failed: bad data never reaches training."""


class QualityGateError(SftflowError):
    """A run's outputs fail a check that guards what happens next."""


class TrainingDiverged(SftflowError):
    """The loss or the weights became nan/inf: training stopped at the step named (a retry would diverge again)."""
