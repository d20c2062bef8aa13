"""``emerdiff-pl``: the command line, a dispatcher that imports a subcommand only when it runs.

``emerdiff-pl <command> ...`` runs ``main(argv)`` of the module named in :data:`SUBCOMMANDS`; ``predict`` is a
LightningCLI (:mod:`emerdiff_pl.commands.predict`), the others are plain argparse programs. Nothing heavy is
imported here, so ``emerdiff-pl --help`` and the light subcommands start in a fraction of a second.

Mistakes a user can fix (a missing folder, a wrong flag value, no GPU) end in one message and exit status 2;
``--debug`` (or ``EMERDIFF_DEBUG=1``) keeps the full traceback. ``--verbose`` (or ``EMERDIFF_VERBOSE=1``) lets
Lightning and diffusers print their usual messages. ``predict``'s help and the mistakes its command line shows on
its own are answered before Lightning is imported (:mod:`emerdiff_pl.commands.preflight`); Ctrl-C exits 130.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from emerdiff_pl.commands import DEBUG_ENV, VERBOSE_ENV, debug_enabled, split_command
from emerdiff_pl.validation import SD_ON_CPU

# name → (module[:function] whose main(argv) runs it, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "predict": (
        "emerdiff_pl.commands.predict",
        "label images (WebDataset shards or a folder) into a pseudo-label shard set",
    ),
    "demo": ("emerdiff_pl.commands.demo", "label a few generated images end to end and show the result"),
    "fit-probe": (
        "emerdiff_pl.commands.fit_probe",
        "fit the few-shot probe of model.classifier: probe on a few labelled images",
    ),
    "relabel": (
        "emerdiff_pl.commands.relabel",
        "map per-image masks to dataset-wide classes via their embeddings (not for named output)",
    ),
    "evaluate": (
        "emerdiff_pl.commands.evaluate",
        "score pseudo-labels against ground-truth shards (Hungarian mIoU; named output: no matching)",
    ),
    "export": (
        "emerdiff_pl.commands.export",
        "relabelled or named shards as images/ + labels/ PNG folders for a segmentation trainer",
    ),
    "show": (
        "emerdiff_pl.commands.show",
        "contact sheet of a shard set: image, overlay, low-res mask, ground truth",
    ),
    "convert": (
        "emerdiff_pl.commands.convert",
        "ground-truth shards (<key>.jpg or .png, <key>.gt.png) for evaluate:",
    ),
    "merge-manifests": (
        "emerdiff_pl.commands.merge",
        "merge per-task manifests and list tasks to resubmit",
    ),
    "submit": (
        "emerdiff_pl.commands.submit",
        "submit a SLURM array sized from the shard count, merge chained after it",
    ),
}
# shown under ``convert`` in the top-level help (each is ``emerdiff-pl convert <name> --help``)
CONVERT_USAGE = (
    "convert toyworld --out gt/ [--num-images 100]   (generated scenes, no download)",
    "convert cocostuff27 --images DIR --annotations DIR --out gt/",
    "convert cityscapes27 --root DIR --out gt/ [--split val]",
)
_USER_ERROR_TYPES = (ValueError, OSError)  # bad values and paths; FileNotFoundError & co. are OSErrors
_USER_ERROR_NAMES = {"UserError", "MisconfigurationException", "OutOfMemoryError"}
# hints for messages that dependencies raise, matched by substring
_HINTS = {
    "No supported gpu backend found": "this machine has no usable GPU: add --trainer.accelerator cpu "
    f"({SD_ON_CPU}), or try configs/toyworld.yaml or configs/tiny.yaml",
    "out of memory": "lower --model.max_branch_batch (e.g. 8) or --data.batch_size, or use --model.dtype bfloat16",
}


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a mistake the user can fix (shown as one message) rather than a bug (traceback)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, _USER_ERROR_TYPES) or bool(names & _USER_ERROR_NAMES)


def format_user_error(command: str, err: BaseException) -> str:
    """One message: the command, what is wrong (the exception's text), and a hint where one is known."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError | OSError) and not isinstance(err, FileNotFoundError) and ":" not in text:
        text = f"{type(err).__name__}: {text}"
    lines = [f"emerdiff-pl {command}: error: {text}"]
    hints = [hint for needle, hint in _HINTS.items() if needle.lower() in text.lower()]
    lines += [f"  hint: {hint}" for hint in hints]
    lines.append(f"  (add --debug or set {DEBUG_ENV}=1 to see the traceback)")
    return "\n".join(lines)


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: emerdiff-pl <command> [options]   (emerdiff-pl <command> --help for its options)",
        "",
        "Pseudo-label segmentation datasets from a frozen Stable Diffusion model (EmerDiff, ICLR 2024).",
        "",
        "commands:",
    ]
    for name, (_, about) in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}  {about}")
        if name == "convert":
            lines += [f"  {'':<{width}}    {usage}" for usage in CONVERT_USAGE]
    lines += [
        "",
        "options of every command: --debug (full tracebacks), --verbose (messages of Lightning and diffusers)",
        "emerdiff-pl --version: the installed version",
        "",
        "first steps:",
        "  emerdiff-pl demo                   the shipped toy model end to end, a few minutes on a CPU",
        "  emerdiff-pl predict --config configs/tiny.yaml --data.folder images/ --writer.output_dir out/",
    ]
    return "\n".join(lines)


def _entry(name: str) -> Any:
    """The ``main`` function of subcommand ``name``; None (after a message) when its module is missing."""
    target, _ = SUBCOMMANDS[name]
    module_name, _, function = target.partition(":")
    if importlib.util.find_spec(module_name) is None:
        print(f"emerdiff-pl {name}: this installation lacks {module_name} (not built yet?)", file=sys.stderr)
        return None
    return getattr(importlib.import_module(module_name), function or "main")


def run_subcommand(name: str, argv: list[str]) -> int:
    """Run subcommand ``name`` with ``argv`` in this process (what the demo chains) and return its exit code."""
    entry = _entry(name)
    if entry is None:
        return 2
    return int(entry(argv) or 0)


def _pop_global_flags(argv: list[str]) -> list[str]:
    """Remove ``--debug`` / ``--verbose`` (before a ``--``) and record them in the environment, so that DDP
    children and subcommands see them too."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut:]
    for flag, env in (("--debug", DEBUG_ENV), ("--verbose", VERBOSE_ENV)):
        if flag in head:
            os.environ[env] = "1"
            head = [a for a in head if a != flag]
    return head + tail


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``emerdiff-pl`` and ``python -m emerdiff_pl``."""
    from_command_line = argv is None
    argv = _pop_global_flags(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["--version"]:
        from emerdiff_pl import __version__

        print(f"emerdiff-pl {__version__}")
        return 0
    picked = split_command(argv, SUBCOMMANDS, _usage(), "emerdiff-pl: unknown command")
    if isinstance(picked, int):
        return picked
    command, rest = picked
    try:
        if command == "predict":
            from emerdiff_pl.commands.preflight import check_command_line

            checked = check_command_line(rest)  # before Lightning is imported: help and mistakes in a moment
            if isinstance(checked, int):
                return checked
            rest = checked
        if command == "predict" and from_command_line:
            from emerdiff_pl.commands.predict import cli_main

            sys.argv[1:] = [command, *rest]  # LightningCLI (and a DDP relaunch) read sys.argv
            cli_main(None)  # None: LightningCLI reads sys.argv, which a DDP launcher re-runs
            return 0
        return run_subcommand(command, rest)
    except KeyboardInterrupt as err:
        if debug_enabled():
            raise
        print(f"emerdiff-pl {command}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return 130
    except Exception as err:
        if debug_enabled() or not is_user_error(err):
            raise
        print(format_user_error(command, err), file=sys.stderr)
        return 2


__all__ = [
    "SUBCOMMANDS",
    "format_user_error",
    "is_user_error",
    "main",
    "run_subcommand",
]
