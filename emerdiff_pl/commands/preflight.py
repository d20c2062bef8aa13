"""``emerdiff-pl predict`` before Lightning is imported (~10 CPU-s): its short help and the mistakes that a
command line shows on its own, each one message naming the flag, in a fraction of a second.

This module imports neither torch nor Lightning. It reads the command line and the ``--config`` files the way
LightningCLI will (YAML values; later files and flags win) and knows the options of the project's groups:
``model.*`` are :class:`~emerdiff_pl.config.EmerDiffConfig`'s fields, ``data.*`` and ``writer.*`` the parameters
of ``EmerDiffDataModule`` and ``PseudoLabelWriter``, read from their source files (signature and docstring).
It checks option names exactly (a prefix such as ``--model.num_mask`` is an error), the config files, the input
and output paths, the model settings' types and ranges, and the settings an output folder recorded. Whatever it
cannot read (``--trainer.*``, appends, inline group configs) it leaves to LightningCLI, which checks everything
again once imported.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

from emerdiff_pl.validation import UserError

USAGE = (
    "usage: emerdiff-pl predict --config CONFIG [--data.* ...] [--writer.* ...] [--model.* ...] "
    "[--trainer.* ...]"
)
EXAMPLE = "emerdiff-pl predict --config configs/tiny.yaml --data.folder images/ --writer.output_dir out/"
# the classes whose constructor parameters are the data: and writer: groups (module, class)
_GROUP_CLASSES = {
    "data": ("emerdiff_pl.data", "EmerDiffDataModule"),
    "writer": ("emerdiff_pl.writer", "PseudoLabelWriter"),
}
_GROUP_TITLES = {
    "data": "input (data.*: EmerDiffDataModule)",
    "writer": "output (writer.*: PseudoLabelWriter)",
    "model": "model (model.*: EmerDiffConfig, the method's settings)",
}
# top-level options of the predict parser (LightningCLI's) that take a value
_VALUED = {
    "-c",
    "--config",
    "--seed_everything",
    "--return_predictions",
    "--trainer",
    "--model",
    "--data",
    "--writer",
}


class Option(NamedTuple):
    """One option of a project group, for the short help and the name check."""

    name: str
    type: str
    default: str
    doc: str


# --------------------------------------------------------------------------------------------------------------
# the project's options, without importing their classes
# --------------------------------------------------------------------------------------------------------------


def doc_entries(doc: str, section: str) -> dict[str, str]:
    """``name → text`` of a Google-style docstring section (``Args:``, ``Attributes:``), continuation lines
    joined."""
    entries: dict[str, str] = {}
    inside, indent, name = False, None, None
    for line in inspect.cleandoc(doc or "").splitlines():
        stripped = line.strip()
        if stripped == f"{section}:":
            inside, indent = True, None
            continue
        if not inside or not stripped:
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        match = re.match(r"(\w+)(?: \([^)]*\))?:\s*(.*)", stripped) if depth == indent else None
        if match:
            name = match[1]
            entries[name] = match[2]
        elif name is not None:
            entries[name] += " " + stripped
    return entries


def _class_options(module: str, cls: str) -> list[Option]:
    """The constructor parameters of ``module.cls`` and their docs, read from its source (nothing imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return []
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    init = next(
        (n for n in (node.body if node else []) if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
        None,
    )
    if node is None or init is None:
        return []
    docs = doc_entries(ast.get_docstring(node) or "", "Args")
    args = init.args.args[1:]  # without self
    defaults = [None] * (len(args) - len(init.args.defaults)) + list(init.args.defaults)
    return [
        Option(
            arg.arg,
            ast.unparse(arg.annotation) if arg.annotation is not None else "",
            _yaml_text(_constant(default, tree)) if default is not None else "",
            docs.get(arg.arg, ""),
        )
        for arg, default in zip(args, defaults, strict=True)
    ]


def _constant(node: ast.expr, tree: ast.Module) -> Any:
    """A default's value (its source text where it is no literal); a module constant's name is followed to its
    value, one import away."""
    if not isinstance(node, ast.Name):
        try:
            return ast.literal_eval(node)
        except ValueError:
            return ast.unparse(node)
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == node.id for t in statement.targets
        ):
            return _constant(statement.value, tree)
        imported = isinstance(statement, ast.ImportFrom) and statement.module and statement.level == 0
        if imported and any((alias.asname or alias.name) == node.id for alias in statement.names):
            spec = importlib.util.find_spec(str(statement.module))
            if spec is not None and spec.origin is not None:
                source = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
                constants = [s for s in source.body if isinstance(s, ast.Assign)]
                return _constant(node, ast.Module(body=constants, type_ignores=[]))
    return node.id


def _model_options() -> list[Option]:
    from emerdiff_pl.config import EmerDiffConfig

    docs = doc_entries(EmerDiffConfig.__doc__ or "", "Attributes")
    return [
        Option(f.name, EmerDiffConfig.type_text(f.name), _yaml_text(f.default), docs.get(f.name, ""))
        for f in dataclasses.fields(EmerDiffConfig)
    ]


def _yaml_text(value: Any) -> str:
    """A default as a YAML config writes it (``null``, ``true``, ``[1, 2]``); other text as it is."""
    import json

    return value if isinstance(value, str) else json.dumps(value, default=str)


def project_options() -> dict[str, list[Option]]:
    """The options of the ``data``, ``writer`` and ``model`` groups, in that order."""
    groups = {group: _class_options(*where) for group, where in _GROUP_CLASSES.items()}
    return {**groups, "model": _model_options()}


# --------------------------------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------------------------------


def short_help(options: dict[str, list[Option]]) -> str:
    """``predict --help``: the project's options first, each with its type, default and doc."""
    width = min(max(shutil.get_terminal_size((110, 20)).columns, 80), 120) - 1
    body = textwrap.TextWrapper(width=width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    about = (
        "Label images with EmerDiff into a pseudo-label WebDataset (shards, manifests, a summary) under "
        "--writer.output_dir. Rerunning the same command resumes; a rerun with other model settings into the "
        "same folder is refused. For example:"
    )
    lines = [
        USAGE,
        "",
        *textwrap.wrap(about, width),
        f"  {EXAMPLE}",
        "",
        "options:",
        "  -c, --config CONFIG   a YAML file of settings (configs/*.yaml); later files and flags override it",
        "  --print_config        print the resolved config, every setting, and exit",
        "  --help-all            every option, Lightning's --trainer.* too (imports Lightning: seconds)",
        "  --debug, --verbose    full tracebacks; the messages of Lightning and diffusers",
    ]
    for group, group_options in options.items():
        lines += ["", f"{_GROUP_TITLES[group]}:"]
        for option in group_options:
            default = f"default {option.default}" if option.default else "required"
            lines.append(f"  --{group}.{option.name}  ({option.type}; {default})"[:width])
            if option.doc:
                lines += body.wrap(option.doc.replace("``", "`"))
    lines += [
        "",
        "trainer (trainer.*): Lightning's Trainer, e.g. --trainer.accelerator cpu, --trainer.devices 4 "
        "(emerdiff-pl predict --help-all lists them)",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# reading the command line
# --------------------------------------------------------------------------------------------------------------


class CommandLine(NamedTuple):
    """What :func:`read_command_line` understood: the merged project groups, and whether it understood all."""

    groups: dict[str, dict[str, Any]]
    complete: bool  # False: something only LightningCLI reads (appends, inline group configs) was given
    print_config: bool


def _suggest(name: str, known: list[str], prefix: str = "") -> str:
    """``; did you mean <prefix><closest>?`` for a misspelt ``name`` among ``known`` (empty when none is close)."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _yaml_file(path: str, flag: str) -> Any:
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{flag} {path!r}: no such file")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path!r} cannot be read ({err})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise UserError(
            f"{flag} {path!r} is not valid YAML{at}: {getattr(err, 'problem', None) or err}"
        ) from None


def _value(group: str, name: str, raw: str) -> Any:
    """A command-line string as LightningCLI reads it for ``group.name``."""
    import yaml

    if group == "model":
        from emerdiff_pl.config import EmerDiffConfig

        return EmerDiffConfig.parse_value(name, raw)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def read_command_line(argv: list[str], options: dict[str, list[Option]]) -> CommandLine:
    """The project groups as ``argv`` sets them (config files, then flags, in order); raises :class:`UserError`
    for an option name that is not exactly one of the project's, or a config file that cannot be read."""
    names = {group: [o.name for o in group_options] for group, group_options in options.items()}
    groups: dict[str, dict[str, Any]] = {group: {} for group in names}
    complete, print_config = True, False

    def merge(values: Any, where: str, only: str | None = None) -> None:
        nonlocal complete
        if not isinstance(values, dict):
            raise UserError(f"{where} must hold a mapping of settings, got {type(values).__name__}")
        if only is not None:
            values = {only: values}
        if "predict" in values and only is None:
            raise UserError(
                f"{where} has a 'predict:' level: after the predict command the config is flat (trainer:, model:, "
                "data:, writer: at the top)"
            )
        for group, known in names.items():
            section = values.get(group)
            if section is None:
                continue
            if not isinstance(section, dict):
                complete = False
                continue
            for name, value in section.items():
                if name not in known:
                    raise UserError(
                        f"{where}: {group}.{name} is not a setting{_suggest(name, known, f'{group}.')} "
                        "(emerdiff-pl "
                        "predict --help lists them)"
                    )
                groups[group][name] = value

    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "--":
            complete = False
            continue
        flag, has_value, value = arg.partition("=")
        if flag == "--print_config":
            print_config = True
            continue
        takes_value = flag in _VALUED or "." in flag
        if takes_value and not has_value:
            if i >= len(argv) or argv[i].startswith("--"):
                raise UserError(f"{flag} needs a value")
            value = argv[i]
            i += 1
        if flag in ("-c", "--config"):
            merge(_yaml_file(value, flag), f"--config {value}")
            continue
        group, _, name = flag[2:].partition(".")
        if group not in names:
            continue  # --trainer.*, --seed_everything, ...: LightningCLI's own
        if not name:  # --model CONFIG: a file, or an inline mapping, for the group
            if Path(value).expanduser().is_file():
                merge(_yaml_file(value, flag), f"{flag} {value}", only=group)
            else:
                complete = False
            continue
        if name.endswith("+"):  # an append (--data.urls+ x.tar): the name is checked, the value left
            name, complete = name[:-1], False
        if name not in names[group]:
            raise UserError(
                f"{flag} is not an option of predict{_suggest(name, names[group], f'--{group}.')} "
                "(options are never abbreviated; emerdiff-pl predict --help lists them)"
            )
        if complete:
            groups[group][name] = _value(group, name, value)
    return CommandLine(groups, complete, print_config)


# --------------------------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------------------------


def check_values(command: CommandLine) -> None:
    """Input and output paths, model settings, and the output folder's recorded settings (what needs no model
    and no Lightning); every problem in one :class:`UserError`."""
    from emerdiff_pl.validation import (
        check_input,
        check_model_values,
        check_output_dir,
        check_probe_file,
        collect_problems,
    )

    data, writer, model = (command.groups[g] for g in ("data", "writer", "model"))
    problems = collect_problems(
        [
            (check_input, (data.get("urls"), data.get("folder"))),
            (check_output_dir, (writer.get("output_dir"),)),
            (check_model_values, (model,)),
        ]
    )
    if problems:
        raise problems
    config = check_model_values(model)
    check_probe_file(config)
    _check_recorded_settings(config, writer)


def _check_recorded_settings(config: Any, writer: dict[str, Any]) -> None:
    """A rerun into a folder labelled with other label-shaping settings (manifest.check_settings, read-only)."""
    from emerdiff_pl.manifest import SettingsChangedError, check_settings

    output_dir = writer.get("output_dir")
    if not output_dir or not Path(str(output_dir)).is_dir():
        return
    allow = writer.get("allow_changed_settings") is True
    try:
        check_settings(
            str(output_dir),
            config.label_settings(),
            config.label_defaults(),
            allow_changed=allow,
            record=False,
        )
    except SettingsChangedError as err:
        raise UserError(str(err)) from None


def check_command_line(argv: list[str]) -> list[str] | int:
    """``predict``'s arguments as LightningCLI should get them (``--help-all`` becomes its ``--help``), or the exit
    code after answering here (``--help``: 0; no arguments: the usage, 2); mistakes raise :class:`UserError`."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head = argv[:cut]
    if "--help-all" in head:
        return ["--help" if a == "--help-all" else a for a in argv]
    options = project_options()
    if "-h" in head or "--help" in head:
        print(short_help(options))
        return 0
    if not argv:
        print(
            f"{USAGE}\n\n  {EXAMPLE}\n\nemerdiff-pl predict --help lists the options; configs/*.yaml are "
            "ready-made settings (tiny.yaml: seconds on a CPU, random weights)",
            file=sys.stderr,
        )
        return 2
    command = read_command_line(argv, options)
    if command.complete and not command.print_config:
        check_values(command)
    return argv


__all__ = [
    "CommandLine",
    "Option",
    "check_command_line",
    "check_values",
    "doc_entries",
    "project_options",
    "read_command_line",
    "short_help",
]
