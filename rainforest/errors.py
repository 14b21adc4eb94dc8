"""One exception family for the whole toolkit.

Every error a user can cause derives from :class:`RainforestError`, so a caller can catch
them all in one place and the CLI can print them without a traceback.
"""


class RainforestError(Exception):
    """Base class of every error rainforest raises on purpose."""


class ParameterError(RainforestError, ValueError):
    """An argument has the wrong value, type or shape; the message names the offending value."""


class AudioDecodeError(RainforestError):
    """A song could not be decoded into samples; the message says why in plain words."""


class DatasetFormatError(RainforestError):
    """A dataset or manifest is missing, foreign, corrupt or of an unknown format version."""


class CheckpointError(RainforestError):
    """A checkpoint is missing, damaged, foreign, or of an unknown format version."""


class StorageError(RainforestError):
    """Input or output storage failed (full, gone, unreachable); the run stops and resumes."""


class SlurmError(RainforestError):
    """A Slurm client command failed; the message gives the command and Slurm's own words."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr
