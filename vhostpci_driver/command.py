"""What both command-line tools (``vhostpci``, ``vhostpci-host``) promise their users.

Exit codes (docs/cli.md): 0 success, 1 a runtime failure (a device, a peer, the
system), 2 a usage error (click's), 128+N when signal N stopped the command (130
for SIGINT, 143 for SIGTERM, 129 for SIGHUP), after it cleaned up. An error is one
line on stderr, ``PROG: error: ...``; under ``--json`` it is also one JSON object
on stdout, ``{"schema": 1, "error": {...}}``, so a script reads one stream. Every
``--json`` document carries ``schema``: :data:`SCHEMA`, raised when a field changes
meaning or goes away (adding fields keeps it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

import click
from click.shell_completion import shell_complete

from vhostpci_driver.errors import VhostPciError

SCHEMA = 1
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: signals that stop a command cleanly (the terminal's Ctrl-C, systemd and kill, a closed terminal)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal's number."""
    return 128 + signum


class Failure(click.ClickException):
    """A one-line runtime failure: exit status 1."""

    exit_code = EXIT_FAILURE


class Stopped(BaseException):
    """A stop signal arrived; raised in the main thread so ``finally`` blocks tear down in order."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Stopped` for the duration (their default would
    kill the process with its children, sockets and temporary files left behind)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Stopped(signum)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def emit(doc: dict[str, Any]) -> None:
    """One ``--json`` document on stdout, with its schema version first."""
    click.echo(json.dumps({"schema": SCHEMA, **doc}, default=str))


def _wants_json(args: Sequence[str]) -> bool:
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args


def _error(prog: str, message: str, code: int, as_json: bool, kind: str) -> NoReturn:
    click.echo(f"{prog}: error: {message}", err=True)
    if as_json:
        emit({"error": {"kind": kind, "message": message, "exit_code": code}})
    sys.exit(code)


class Group(click.Group):
    """A command group whose errors, signals and exit codes follow the module's rules.

    ``runtime_errors`` are the exception types that are a runtime failure, not a
    bug: they become one line and exit 1 (the traceback only with ``--debug``).
    """

    runtime_errors: tuple[type[BaseException], ...] = (VhostPciError, OSError)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **kw: Any) -> NoReturn:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        prog = prog_name or self.name or "command"
        # click's shell completion (docs/cli.md): _VHOSTPCI_COMPLETE=bash_source and friends
        complete_var = f"_{prog}_COMPLETE".replace("-", "_").upper()
        instruction = os.environ.get(complete_var)
        if instruction:
            sys.exit(shell_complete(self, {}, prog, complete_var, instruction))
        as_json = _wants_json(argv)
        debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv
        try:
            self.run(argv, prog)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.UsageError as e:
            if as_json:
                emit({"error": {"kind": "usage", "message": e.format_message(), "exit_code": EXIT_USAGE}})
            e.show()
            sys.exit(EXIT_USAGE)
        except click.ClickException as e:
            _error(prog, e.format_message(), e.exit_code, as_json, "failure")
        except click.Abort:
            _error(prog, "aborted", signal_exit_code(signal.SIGINT), as_json, "signal")
        except KeyboardInterrupt:
            _error(prog, "interrupted (SIGINT)", signal_exit_code(signal.SIGINT), as_json, "signal")
        except Stopped as e:
            _error(prog, f"stopped by {e}", signal_exit_code(e.signum), as_json, "signal")
        except self.runtime_errors as e:
            if debug:
                raise
            _error(prog, str(e) or type(e).__name__, EXIT_FAILURE, as_json, "failure")
        sys.exit(EXIT_OK)

    def run(self, argv: list[str], prog: str) -> None:
        with self.make_context(prog, argv) as ctx:
            self.invoke(ctx)


def exit_for(signum: int | None) -> None:
    """After a clean stop: exit with the signal's code if a signal asked for it."""
    if signum is not None:
        raise SystemExit(signal_exit_code(signum))


def signal_stopper(stop: Callable[[int], None]) -> None:
    """Route every stop signal to ``stop(signum)`` (a loop that sets a flag and wakes up)."""
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, _f: stop(signum))
