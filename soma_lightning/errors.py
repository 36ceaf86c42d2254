"""The errors that end in one line on stderr and exit code 2; a light module, importable without the model code."""


class UserError(Exception):
    """A mistake in the user's input (a spec, a path, an argument): reported as one line, exit code 2."""


class TrainingStopped(UserError):
    """A run that stopped itself (a non-finite loss): reported as one line, exit code 2."""


class SpecError(UserError, ValueError):
    """A spec mistake; the message starts with the YAML key path."""


class DataError(UserError):
    """A mistake in the data a spec names (a source, a prepared corpus); the message starts with the data.* key."""
