"""Errors a user can act on. Each message says what is wrong and what to change."""


class JobcellError(Exception):
    """Base class for jobcell's own errors."""


class ConfigError(JobcellError):
    """A setting or the size-class table is invalid; raised at start, before any job runs."""


class SubmitError(JobcellError):
    """A document cannot be submitted (missing file, unreadable S3 object...)."""


class NotFound(JobcellError):
    """No job with that id."""


class DocumentMissing(JobcellError):
    """A job's stored document is gone (deleted object, pruned file): it will never be there again."""


class DatabaseUnavailable(JobcellError):
    """The database cannot be used: down past the retry budget, or refusing our credentials."""


class StateError(JobcellError):
    """The job is not in a state that allows this (retrying a running job, say)."""
