class UserError(Exception):
    """A mistake in the user's input (a spec, a path, an argument): reported as one line, exit code 2."""
