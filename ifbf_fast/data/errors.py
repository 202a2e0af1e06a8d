"""The data layer's two error types, shared by every reader (``cityscapes``, ``folder``, ``classes``)."""


class DatasetLayoutError(ValueError):
    """The folder is not (or not completely) a dataset layout this package reads. The message is one line."""


class DataReadError(OSError):
    """A file could not be read or decoded. The message names the file."""
