"""Subcommands of ``emerdiff-pl``: one module per command, each with a ``main(argv) -> int``."""
