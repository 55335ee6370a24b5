"""The project's error types: what the CLI prints on one line, never as a traceback."""


class TptError(Exception):
    """An expected, user-facing error: the CLI prints its message on one line and exits 2."""


class ConfigError(TptError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""
