import importlib


class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


class Terminated(BaseException):
    """SIGTERM reached a process that turns it into this exception (hhbench.launch.cluster.run_local, while it waits
    on its jobs), so that its `finally` blocks run as on Ctrl-C: the CLI prints one line and exits 143 (128 +
    SIGTERM). A BaseException, as KeyboardInterrupt is, so that no `except Exception` takes it for a failure."""


class Unsupported(Exception):
    """A backend or model cannot run this particular point: the row gets status `unsupported` and this reason."""


def require_extra(module: str, extra: str = "eval"):
    """`module` imported ("transformers", "lm_eval.tasks", ...): the packages of an optional extra of hhbench are
    imported through here, so that a wheel installed without the extra fails in one line (UserError naming
    `pip install 'hhbench[EXTRA]'`), not with a traceback."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or module).split(".")[0]
        raise UserError(f"{missing} is not installed: pip install 'hhbench[{extra}]'") from None
