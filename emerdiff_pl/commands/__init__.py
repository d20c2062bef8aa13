"""Subcommands of ``emerdiff-pl``: one module per command, each with a ``main(argv) -> int``.

Also the switches every command shares, read from the environment so that DDP children and in-process
subcommands see them too: ``--debug`` (tracebacks) and ``--verbose`` (dependencies' own messages).
"""

from __future__ import annotations

import os

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


__all__ = ["DEBUG_ENV", "VERBOSE_ENV", "debug_enabled", "verbose_enabled"]
