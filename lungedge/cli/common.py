"""What every command module shares: the root app, ``main`` (which runs it) and output helpers."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import signal
import sys
import threading

import typer

from ..errors import LungedgeError

app = typer.Typer(
    name="lungedge",
    help=(
        "Train, export, quantise, benchmark and deploy lung-image classifiers "
        "(ResNet50, GoogLeNet, Inception v3, DenseNet121) from a workstation to an NVIDIA Jetson."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class StdoutError(LungedgeError, OSError):
    """Standard output could not be written (full disk, I/O error): ``cannot write to standard output: ...``.
    Also an OSError, so code that handles a failed write goes on handling it."""


class _GuardedStdout:
    """``sys.stdout`` while a command runs: a failed write or flush becomes a :class:`StdoutError` naming
    standard output (the OSError alone says only "No space left on device"); a closed pipe (EPIPE) stays the
    OSError that typer ends quietly on. Everything else is the stream's own."""

    def __init__(self, stream):
        self._stream = stream
        self.failed = False

    def _guard(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            self.failed = True
            if exc.errno in (None, errno.EPIPE) or isinstance(exc, StdoutError):
                raise
            raise StdoutError(f"cannot write to standard output: {exc.strerror or exc}") from None

    def write(self, text):
        return self._guard(self._stream.write, text)

    def writelines(self, lines):
        return self._guard(self._stream.writelines, lines)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _drop_pending(stream) -> None:
    """Discard what ``stream`` (standard output, found unwritable) still buffers: its file descriptor now
    leads to /dev/null, so Python's flush at exit neither fails nor reports the same failure again."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
        stream.flush()
    except (OSError, ValueError, AttributeError):  # not a file (tests' capture), or closed
        pass


def print_json(obj) -> None:
    """``obj`` as JSON on stdout, always valid UTF-8: the undecodable bytes of a file name (lone surrogates,
    Python's ``surrogateescape``) are written as ``\\udcXX`` escapes, other characters as they are."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    sys.stdout.write(re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


def print_result(result, json_out: bool, line: str) -> None:
    """A command's result: the whole of it as JSON with --json, else its one-line summary."""
    if json_out:
        print_json(result)
    else:
        typer.echo(line)


EXIT_BAD_INPUT = 2  # the input or the environment is wrong; the one line says what
EXIT_INTERNAL = 3  # an unexpected error (a bug): one line, the traceback in a log file
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (128 + 15): docker stop, systemd, kill


class _Signals:
    terminated = False  # a SIGTERM stopped this command (said as such, exit 143)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM stops a command as Ctrl-C does: every clean-up a KeyboardInterrupt runs runs (a set of files being
    written stays whole, a training keeps its last finished epoch and says so). Without it Python dies at once,
    and as a container's PID 1 (Dockerfile.jetson's ENTRYPOINT) it ignores the signal until docker stop's
    SIGKILL."""
    _Signals.terminated = True
    raise KeyboardInterrupt


def one_line(text: str, limit: int = 1000) -> str:
    """Any message as one line (whitespace folded, cut at ``limit`` characters)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def command_of(argv: list[str]) -> str:
    """The (sub)command ``argv`` names, e.g. ``data inspect``; ``lungedge`` when there is none."""
    try:
        cmd = typer.main.get_command(app)
    except Exception:  # noqa: BLE001 - only used to name the command in a message
        return "lungedge"
    parts = []
    for tok in argv:
        sub = getattr(cmd, "commands", None)
        if isinstance(sub, dict) and tok in sub:
            parts.append(tok)
            cmd = cmd.commands[tok]
        elif tok.startswith("-"):
            continue
        else:
            break
    return " ".join(parts) or "lungedge"


def _internal_error(exc: BaseException, argv: list[str]) -> int:
    import platform
    import traceback

    from .. import __version__
    from ..io import write_log

    command = command_of(argv)
    text = (f"lungedge {__version__} (Python {platform.python_version()}, {platform.platform()})\n"
            f"command: lungedge {' '.join(argv)}\n\n" + "".join(traceback.format_exception(exc)))
    log = write_log(command.replace(" ", "-"), text)
    message = one_line(str(exc)) or "(no message)"
    where = f"details in {log}" if log else "no log could be written (cache and temp folders are read-only)"
    typer.echo(f"error: internal error in {command}: {type(exc).__name__}: {message}; {where}", err=True)
    return EXIT_INTERNAL


def _interrupted() -> int:
    from ..io import KEPT

    what = "terminated (SIGTERM)" if _Signals.terminated else "interrupted"
    typer.echo(what + (f"; {'; '.join(KEPT)}" if KEPT else ""), err=True)
    return EXIT_TERMINATED if _Signals.terminated else EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code.

    Exit codes: 0 success; 2 bad input or environment (one ``error:`` line says what); 3 internal
    error (one ``error: internal error in ...`` line, the traceback in a log file under
    ``~/.cache/lungedge/logs``); 130 interrupted (Ctrl-C: ``interrupted`` and what was kept); 143 the same
    stop by SIGTERM (:func:`_on_sigterm`).
    Every command is registered on :data:`app` by ``lungedge.cli`` (always imported before
    this module), so ``main`` runs the full command line.
    """
    from .. import io as _io

    argv = list(sys.argv[1:] if argv is None else argv)
    _io.KEPT.clear()
    _io.COMMAND = f"lungedge {command_of(argv)}".replace("lungedge lungedge", "lungedge")
    real = sys.stdout
    guarded = sys.stdout = _GuardedStdout(real) if real is not None and not isinstance(real, _GuardedStdout) else real
    _Signals.terminated = False
    caught, previous = _catch_sigterm()
    try:
        return _main(argv, guarded)
    finally:
        if caught:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if isinstance(guarded, _GuardedStdout) and guarded.failed:
            _drop_pending(real)
        if sys.stdout is guarded:  # (typer may have put its own wrapper around it after a closed pipe: kept)
            sys.stdout = real


def _catch_sigterm():
    """Install :func:`_on_sigterm`: (installed, the handler it replaced); not where none can be set (a thread
    other than the main one)."""
    if threading.current_thread() is not threading.main_thread():
        return False, None
    try:
        return True, signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        return False, None


def _usage_error_class():
    try:
        from typer._click.exceptions import UsageError  # typer >= 0.20 carries its own click
    except ImportError:
        from click.exceptions import UsageError
    return UsageError


def _show_usage_error(self, file=None) -> None:
    """A usage error (an option's value that does not parse, a missing or unknown option) as one ``error:``
    line naming the command and its --help, instead of click's usage, hint and ``Error:`` lines."""
    command = self.ctx.command_path if self.ctx is not None else "lungedge"
    typer.echo(f"error: {one_line(self.format_message())} (see '{command} --help')", err=True)


def _empty_path(argv: list[str]) -> str | None:
    """The option or argument that takes a path and is given an empty one (``--out "$UNSET"``): typer reads
    ``""`` as the current folder, so ``report --results ""`` read every result under it and ``demo --data ""``
    trained on it. None when there is none (or the command line does not parse: typer says why)."""
    try:
        return _find_empty_path(typer.main.get_command(app), list(argv))
    except Exception:  # noqa: BLE001 - only a pre-check: typer parses the command line
        return None


def _find_empty_path(cmd, rest: list[str]) -> str | None:
    while rest and isinstance(getattr(cmd, "commands", None), dict) and rest[0] in cmd.commands:
        cmd = cmd.commands[rest.pop(0)]
    params = getattr(cmd, "params", None) or []
    def is_path(param) -> bool:  # a pathlib.Path parameter (typer's own parameters keep the annotation)
        if getattr(getattr(param, "type", None), "name", "") == "path":
            return True
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        return annotation is not None and ("pathlib.Path" in str(annotation) or annotation is pathlib.Path)

    options = {o: p for p in params if getattr(p, "param_type_name", "") == "option" for o in p.opts}
    arguments = [p for p in params if getattr(p, "param_type_name", "") == "argument"]
    positional, i = 0, 0
    while i < len(rest):
        tok = rest[i]
        name, eq, value = tok.partition("=")
        if tok.startswith("-") and name in options:
            param = options[name]
            if param.is_flag:
                i += 1
                continue
            if not eq:
                value, i = (rest[i + 1] if i + 1 < len(rest) else None), i + 1
            if value == "" and is_path(param):
                return name
        elif not tok.startswith("-") or tok == "-":
            param = (arguments[min(positional, len(arguments) - 1)] if arguments and (
                positional < len(arguments) or arguments[-1].nargs == -1) else None)
            if tok == "" and param is not None and is_path(param):
                return param.metavar or param.name.upper()  # FOLDER, IMAGES, FILE.onnx
            positional += 1
        i += 1
    return None


def _main(argv: list[str], stdout) -> int:
    usage_error = _usage_error_class()
    click_show, usage_error.show = usage_error.show, _show_usage_error  # subclasses with their own show keep it
    try:
        try:
            empty = _empty_path(argv)
            if empty is not None:
                raise LungedgeError(f"{empty} is an empty path (an unset variable?); give a file or folder, "
                                    "or '.' for the current folder")
            app(args=argv, prog_name="lungedge")
        except SystemExit:
            if stdout is not None:
                stdout.flush()  # what the command printed leaves now: a failure is said here, not at Python's exit
            raise
    except SystemExit as exc:  # typer exits on its own after every command and usage error
        code = exc.code
        code = code if isinstance(code, int) else (0 if code is None else 1)
        return _interrupted() if code == EXIT_INTERRUPTED else code  # typer turns Ctrl-C into exit 130
    except LungedgeError as exc:
        typer.echo(f"error: {one_line(exc) or type(exc).__name__}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except MemoryError:
        typer.echo(f"error: out of memory in {command_of(argv)}; use smaller inputs "
                   "(--batch-size, --image-size) or a machine with more memory", err=True)
        return EXIT_BAD_INPUT
    except RecursionError as exc:
        return _internal_error(exc, argv)
    except Exception as exc:  # noqa: BLE001 - the last-resort handler: one line, traceback to a log
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE and getattr(stdout, "failed", False):
            return 1  # standard output's reader has gone (| head -1): quiet, as typer ends a closed pipe
        known = _known_os_error(exc)
        if known:
            typer.echo(f"error: {known}", err=True)
            return EXIT_BAD_INPUT
        return _internal_error(exc, argv)
    finally:
        usage_error.show = click_show
    return 0


def _known_os_error(exc: BaseException) -> str | None:
    """One line for an environment failure that no command anticipated (full disk, read-only folder, ...)."""
    import errno
    import os

    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    where = exc.filename if exc.filename is not None else None
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and isinstance(where, (str, bytes)):
        from ..io import not_a_folder

        blocker = not_a_folder(os.fsdecode(where))  # a file given where a folder must be (--explain, --to, ...)
        if blocker is not None:
            return one_line(f"{blocker} exists and is not a folder")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ELOOP,
                     errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE):
        return one_line(f"{exc.strerror}: {where}" if where is not None else exc.strerror or str(exc))
    return None


def max_bacc_drop_option():
    from ..gate_limits import MAX_BACC_DROP_POINTS

    return typer.Option(MAX_BACC_DROP_POINTS, "--max-bacc-drop", help="Gate: largest allowed drop of balanced "
                        "accuracy, in points, judged on the 95% interval's lower bound.")


def max_sens_drop_option():
    from ..gate_limits import MAX_SENS_DROP_POINTS

    return typer.Option(MAX_SENS_DROP_POINTS, "--max-sens-drop", help="Gate: largest allowed drop of each class's "
                        "sensitivity, in points, judged on the interval's lower bound.")
