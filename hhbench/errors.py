class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


class Unsupported(Exception):
    """A backend or model cannot run this particular point: the row gets status `unsupported` and this reason."""
