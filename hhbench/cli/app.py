"""The `hhbench` command. Each subcommand lives in its own module and registers itself on `app`."""

import sys

import typer

from hhbench.errors import Terminated, UserError

app = typer.Typer(
    name="hhbench",
    help="Cost, speed and quality of head-level (HydraHead) and layer-wise hybrid attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Cost, speed and quality of head-level (HydraHead) and layer-wise hybrid attention."""


def _register_commands() -> None:
    from hhbench.cli import distill, eval, flops, gate, merge, report, select_heads, sweep, table  # noqa: F401  (importing a module registers its command)


def _cli_exceptions() -> tuple[type[BaseException], ...]:
    """Usage errors come from click, or from the click that recent Typer releases vendor."""
    found: list[type[BaseException]] = []
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    base = getattr(getattr(typer, "exceptions", None), "TyperException", None)
    if base is not None:
        found.append(base)
    return tuple(found)


def fail(message: str, code: int = 2) -> None:
    """Print 'hhbench: error: <message>' on stderr, a multi-line message joined into that one line, and exit with
    `code` (2: a usage error, as UserError)."""
    print(f"hhbench: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)
TERMINATED = 143  # and by SIGTERM (128 + 15)


def interrupted(how: str = "interrupted", code: int = INTERRUPTED) -> None:
    """Print the one line an interrupt gets, `how` it came (what was finished is kept: rerunning resumes), and exit
    with `code`: 130 after Ctrl-C, TERMINATED after a SIGTERM."""
    print(f"hhbench: {how}; rerun the same command to resume", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input of any kind ends in one line on stderr and exit code 2, never a traceback; an
    interrupt (Ctrl-C) ends in one line and exit code 130, a SIGTERM that a launch turned into Terminated in one line
    and exit code 143."""
    _register_commands()
    command = typer.main.get_command(app)
    try:
        # Typer catches a KeyboardInterrupt inside the command itself and, without standalone mode, returns
        # its Exit(130) code instead of raising: that return value is the interrupt.
        code = command.main(args=argv, prog_name="hhbench", standalone_mode=False)
    except UserError as exc:
        fail(str(exc))
    except _cli_exceptions() as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help text is already printed
            raise SystemExit(2) from None
        where = f"hhbench {ctx.info_name}" if ctx is not None and ctx.parent is not None else "hhbench"
        hint = f" (see '{where} --help')" if hasattr(exc, "ctx") else ""
        fail(exc.format_message() + hint)
    except (KeyboardInterrupt, typer.Abort):
        interrupted()
    except Terminated:
        interrupted("terminated (SIGTERM)", TERMINATED)
    if code == INTERRUPTED:
        interrupted()
    raise SystemExit(code if isinstance(code, int) else 0)
