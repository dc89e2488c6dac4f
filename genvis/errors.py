"""The one error type the CLI turns into a single line and a non-zero exit."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), for one-line
    errors that quote a library's own message."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class GenvisError(Exception):
    """Bad input: the message names the file, key or value at fault and what was expected."""


class DataError(GenvisError):
    """A dataset or image file that cannot be used."""


class ConfigError(GenvisError):
    """A config key or value that is unknown or of the wrong type."""


class OptionError(GenvisError, ValueError):
    """A bad value of one named option (a sampling field, say). `key` is the field name, so each
    caller can name it the way its user wrote it: `sample.steps` in a config, `--steps` on the CLI."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
