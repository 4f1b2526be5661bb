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


class DiskFullError(SftflowError):
    """A write failed for lack of space (ENOSPC): a retry fails the same way until space is freed."""


def disk_full(error: BaseException, where, setting: str | None = None) -> DiskFullError | None:
    """Return the one-line error for `error` if it is a full disk (ENOSPC, or a quota), naming the file it names,
    else `where`, and the setting that moves it; else None."""
    import errno

    if not isinstance(error, OSError) or error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    why = "quota exceeded" if error.errno == errno.EDQUOT else "the disk is full"
    fix = f"set {setting} to a disk with room" if setting else "write somewhere with room"
    return DiskFullError(f"no space left on {error.filename or where} ({why}); free space there, or {fix}")


class StepFailed(Exception):
    """A pipeline run failed for a reason that is not the user's (a bug, an outage that outlived its retries); the
    message is the failure hook's one line: the step, why, where the outputs are, the command that reruns it."""
