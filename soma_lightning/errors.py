class UserError(Exception):
    """A mistake in the user's input (a spec, a path, an argument): reported as one line, exit code 2."""


class TrainingStopped(UserError):
    """A run that stopped itself (a non-finite loss): reported as one line, exit code 2."""
