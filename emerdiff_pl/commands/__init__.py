"""Subcommands of ``emerdiff-pl``: one module per command, each with a ``main(argv) -> int``.

Also what every command shares: the choice of a command by its first word (:func:`split_command`, for
``emerdiff-pl <command>`` and ``emerdiff-pl convert <dataset>``), and the switches read from the environment, so
that DDP children and in-process subcommands see them too: ``--debug`` (tracebacks) and ``--verbose``
(dependencies' own messages).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection

DEBUG_ENV = "EMERDIFF_DEBUG"
VERBOSE_ENV = "EMERDIFF_VERBOSE"


def _flag(env: str) -> bool:
    return os.environ.get(env, "0").strip().lower() not in ("", "0", "false", "no")


def debug_enabled() -> bool:
    """True when tracebacks should be shown (``--debug`` or ``EMERDIFF_DEBUG=1``)."""
    return _flag(DEBUG_ENV)


def verbose_enabled() -> bool:
    """True when dependencies may print their info lines and warnings (``--verbose`` or ``EMERDIFF_VERBOSE=1``)."""
    return _flag(VERBOSE_ENV)


def split_command(
    argv: list[str], choices: Collection[str], usage: str, unknown: str
) -> tuple[str, list[str]] | int:
    """(the first word, the arguments after it) when the word is one of ``choices``; else the exit code, after
    printing ``usage`` (``--help``: 0; no word: 2) or ``unknown``, the word and the usage (2)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] not in choices:
        print(f"{unknown} {argv[0]!r}\n\n{usage}", file=sys.stderr)
        return 2
    return argv[0], argv[1:]


__all__ = ["DEBUG_ENV", "VERBOSE_ENV", "debug_enabled", "split_command", "verbose_enabled"]
