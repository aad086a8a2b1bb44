"""Errors in what a user gave a command, and the one way every command reports them.

An input error is one the user fixes by changing the command line, a file or a config: a
path that does not exist, a file that lacks a field, a mistyped flag or config override.
The commands (train.py, eval.py, generate.py, `python -m metamorph_jax.data.encode`,
`python -m metamorph_jax.evaluation.score_cli`, `python -m convert`) run their `main`
through `run_command`, which prints such an error as one line `error: ...` on stderr and
exits 2. Anything else is a bug here and keeps its traceback; so does an input error when
the command line has `--debug`.

What counts as input:
- `InputError` and its subclasses: the library's named errors derive from it
  (StageConfigError, BenchmarkFileError, TokenStoreError, ConfigFileError,
  ConversionError, DistributedConfigError, ...), and `BadInput` is the plain one, a
  ValueError, for a value the user gave;
- a missing, unreadable or already existing path (FileNotFoundError, NotADirectoryError,
  IsADirectoryError, PermissionError, FileExistsError): every path a command opens came
  from its user, directly or through a config or a folder;
- absl's flags.Error (train.py's flags and --config overrides).

This module imports nothing of the library, so every layer (models and data included)
may derive its errors from it; it must stay cheap to import (no JAX), since commands load
it before deciding the platform.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

EXIT_INPUT_ERROR = 2   # as argparse and absl exit on a bad flag
DEBUG_FLAG = "--debug"

# The OSErrors a user's path causes; other OSErrors (a full disk, a dead connection) are
# not input errors.
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError)


class InputError(Exception):
    """Raised for input the user can fix (a path, a file's content, a field, a flag, a
    config); the message names what is wrong and where."""


class BadInput(InputError, ValueError):
    """A value the user gave (in a flag, a file or a config) that cannot be used."""


class UsageError(BadInput):
    """A command line that does not parse (unknown flag, missing argument, bad choice)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, raising UsageError instead of printing the usage and exiting,
    and taking --debug (read by run_command)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true",
                          help="show the traceback of any error (also of bad input)")

    def error(self, message: str):
        raise UsageError(message)


def is_input_error(error: BaseException) -> bool:
    if isinstance(error, (InputError, *PATH_ERRORS)):
        return True
    absl_flags = sys.modules.get("absl.flags")   # loaded where a command uses absl
    return absl_flags is not None and isinstance(error, absl_flags.Error)


def one_line(error: BaseException) -> str:
    """The error's message on one line. A KeyError's str() is the repr of its argument
    (quotes and escaped newlines); its argument itself is the message."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = str(error)
    if isinstance(error, PATH_ERRORS) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
        if error.filename2 is not None:
            text += f" ({error.filename2})"
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(error).__name__


def unknown_override(error: KeyError | AttributeError, argv: Sequence[str],
                     flag: str = "config") -> str:
    """The message for a `--config.a.b=...` override naming a field the config lacks.
    ml_collections raises an AttributeError holding KeyError("'b'\\nDid you mean \\"c\\"
    instead of \\"b\\"?"), which names the missing key alone; the override naming it is
    found in argv."""
    while error.args and isinstance(error.args[0], BaseException):   # AttributeError(KeyError)
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    lines = text.splitlines() or [""]
    key = lines[0].strip().strip("'\"")
    prefix = f"--{flag}."
    overrides = [arg.split("=", 1)[0] for arg in argv if arg.startswith(prefix)]
    named = [o for o in overrides if key in o[len(prefix):].split(".")]
    where = named[0] if named else (f"a --{flag}.* override (field {key!r})" if key
                                   else f"a --{flag}.* override")
    message = f"{where}: no such field"
    hint = " ".join(lines[1:])
    if hint.startswith("Did you mean "):
        suggestion = hint[len("Did you mean "):].split(" instead of ")[0]
        message += f"; did you mean {suggestion}?"
    return message


def run_command(main: Callable[..., int], argv: Sequence[str] | None = None) -> int:
    """main(argv) (main() when argv is None, which then reads sys.argv); an input error
    becomes one line `error: ...` on stderr and the exit status 2. Prepares the process
    first (platforms.quiet_start: the platform JAX starts on, no transformers notice), so
    a command's module should import JAX and transformers only inside main."""
    from metamorph_jax import platforms
    platforms.quiet_start()
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        return main() if argv is None else main(argv)
    except Exception as error:   # noqa: BLE001 -- classified, re-raised unless input
        if DEBUG_FLAG in words or not is_input_error(error):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
