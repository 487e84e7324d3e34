"""Errors a user can act on. The CLI prints their message alone, without a traceback."""


class LoopFMError(Exception):
    """Base of every user-facing error: the message names the file, field or row count."""


class MissingInputError(LoopFMError):
    """A stage's input is missing (a file, or an upstream stage that has not run)."""


class DataValidationError(LoopFMError):
    """The event log breaks the contract (strict mode, or nothing valid is left)."""


class VersionMismatchError(LoopFMError):
    """A store, checkpoint or feature set does not match what its reader expects."""


class RowCountError(VersionMismatchError):
    """A stage's output holds another number of rows than its inputs say it must (a lost or
    doubled row in a join, a shuffle or a write): the output is refused before it is published."""


class UnsupportedLocationError(LoopFMError):
    """A run directory given as a URI the stages cannot write (`s3://...`): refused rather than
    taken for a local folder named after the scheme."""
