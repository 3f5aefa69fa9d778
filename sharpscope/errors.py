"""The one exception type for bad user input."""


class InputError(Exception):
    """Bad input from the user (a file, a spec, an option): the CLI prints the message as one
    line on stderr and exits with code 2. The message names the problem and the fix."""
