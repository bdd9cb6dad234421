"""The `ilr` command line. Every command is a thin shell over an importable function."""
from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from data.config import pin_workspace
from data.errors import IlrError

from flows.console import _fail, err


class _Commands(TyperGroup):
    """The one error wrapper of the CLI: an IlrError from any command (or the workspace callback) becomes its
    message on stderr and exit code 2; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except IlrError as e:
            _fail(e)


app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=False,
                  help="ilr: instance-level recognition platform")


_interrupted = 0   # the signal that interrupted the command (SIGINT, SIGTERM), else 0


def _on_interrupt(signum, frame) -> None:
    """Ctrl-C (or SIGTERM): stop the command (KeyboardInterrupt), and make sure it ends. The terminal's Ctrl-C
    also stops the temporary Prefect server and the local Ray this process started; a flow that then reports
    its crash to the gone server would retry for minutes, so after a grace period (10 s, or what the command
    asked for: data.processes.allow_stop_time) the process exits, with status 128 + the signal's number."""
    global _interrupted
    if not _interrupted:
        from data.processes import stop_grace_s

        _exit_after(stop_grace_s())
    _interrupted = _interrupted or signum
    raise KeyboardInterrupt


def _exit_after(seconds: float) -> None:
    import threading
    import time

    def deadline() -> None:
        time.sleep(seconds)
        _hard_exit()

    threading.Thread(target=deadline, daemon=True).start()


def _hard_exit() -> None:
    from data.processes import end_own_group

    err.print("interrupted: nothing finished is lost; run the same command again to go on from there")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        end_own_group()  # this exit skips Ray's and Prefect's own shutdown of what they started
    finally:
        os._exit(128 + int(_interrupted or 2))


@app.callback()
def _workspace() -> None:
    """Resolve the workspace once, here in the driver (absolute repo, home, params file, stores): every
    worker and background process this command starts gets these values. A bad params file stops here."""
    import signal
    import threading

    from flows.config import check_params

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)  # Ctrl-C: see main()
    from flows.prefect_server import protect_local

    pin_workspace()
    check_params()
    protect_local()


from flows import cli_data, cli_models, cli_service  # noqa: E402  (the commands, registered below)

app.add_typer(cli_data.data_app, name="data")
app.add_typer(cli_models.commands)
app.add_typer(cli_models.model_app, name="model")
app.add_typer(cli_service.commands)
app.add_typer(cli_service.index_app, name="index")
app.add_typer(cli_service.flows_app, name="flows")


def _quick_exit(code) -> None:
    """Python's own exit less its slowest step: after a command that loaded torch, Ray, MLflow and Prefect,
    tearing the interpreter down (module globals, C++ destructors) costs ~3 s of CPU and changes nothing. So:
    what an exit must do (threading's exit hooks, which tell thread pools such as MLflow's artifact uploads to
    end, then wait for non-daemon threads; the atexit handlers: Ray's shutdown, Prefect's and logging's
    flushes; flush every open file), then end the process with the same exit status."""
    import atexit
    import gc
    import io
    import threading

    threading._shutdown()  # as the interpreter's exit does; joining the threads alone waits forever on a pool
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):  # sys.exit("message"): as Python prints it
        print(code, file=sys.stderr)
        code = 1
    buffered = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)
    for f in gc.get_objects():
        if type(f) in buffered:
            try:
                f.flush()
            except (OSError, ValueError):  # closed, or a broken pipe
                pass
    os._exit(code or 0)


def main() -> None:
    """The console entry. After Ctrl-C, exit at once (130): Ctrl-C also stops the temporary Prefect server
    and the local Ray that this process started, and waiting at exit for their clients to drain would hang.
    Everything the command finished is kept (tune checkpoints, versions, index rows): run it again to go on.
    SIGTERM (`kill PID`, a supervisor) stops a command the same way, exit status 143 (`ilr serve` has its
    own). Otherwise the exit skips the interpreter's teardown (_quick_exit); a crash keeps Python's own exit
    and traceback."""
    import signal

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_interrupt)
    global _interrupted
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    except Exception as e:
        from data.processes import interrupt_behind

        if not (signum := interrupt_behind(e)):
            raise
        _interrupted = _interrupted or signum  # a stop that a library turned into another error
    finally:
        if _interrupted:
            _hard_exit()
    _quick_exit(code)


if __name__ == "__main__":
    main()
