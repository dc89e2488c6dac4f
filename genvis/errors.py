"""The one error type the CLI turns into a single line and a non-zero exit."""


class GenvisError(Exception):
    """Bad input: the message names the file, key or value at fault and what was expected."""


class DataError(GenvisError):
    """A dataset or image file that cannot be used."""


class ConfigError(GenvisError):
    """A config key or value that is unknown or of the wrong type."""
