"""The ``st-peft`` argument parser: subcommands, ``--config`` YAML files and one-line errors.

Flags and YAML keys come from the schema (:mod:`st_peft_cli.options`). A mistake in them prints one
line, with the closest flag, key or choice when one is near, and exits with status 2; ``--help``
shows every option's default.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from st_peft_cli.options import (
    COMMANDS,
    Choices,
    DefaultsHelpFormatter,
    OptionError,
    add_arguments,
    did_you_mean,
    validate,
    yaml_value,
)

USAGE_ERROR = 2
"""Exit status of a mistake in what the user asked for."""

DESCRIPTION = "The st-peft console script: train, evaluate, pretrain and push spatio-temporal forecasters."


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, with the closest flag or choice when one is near;
    ``--help`` shows every option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        choice = re.match(r"argument (\S+?)(?:/\S+)?: invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if unknown:
            message += did_you_mean(unknown.group(1).split("=")[0], self._option_string_actions)
        elif choice:
            message += did_you_mean(choice.group(2), re.findall(r"'([^']*)'", choice.group(3)))
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser(choices: Choices | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per entry of :data:`~st_peft_cli.options.COMMANDS`.

    Args:
        choices: replaces the declared choices of the options it names (``st_peft.cli`` passes its registries').
    """
    from st_peft_cli import __version__

    parser = OneLineParser(prog="st-peft", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"st-peft {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        sub.add_argument("--config", help="YAML file of options; command-line flags override it")
        sub.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        add_arguments(sub, command.schema, choices)
        commands[name] = sub
    return parser, commands


def _yaml_defaults(path: str, sub: argparse.ArgumentParser, schema: type) -> dict[str, Any]:
    """The options of a ``--config`` YAML file, read like the flags (validated with them afterwards)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle) or {}
    except UnicodeDecodeError as error:
        sub.error(f"--config {path}: not a UTF-8 text file ({error.reason} at byte {error.start})")
    except (OSError, yaml.YAMLError) as error:
        sub.error(f"--config {path}: {' '.join(str(error).split())}")
    if not isinstance(content, dict):
        sub.error(f"{path}: expected a mapping of options, got {type(content).__name__}")
    settings = {str(key).replace("-", "_"): value for key, value in content.items()}
    known = {action.dest for action in sub._actions} - {"help", "config"}
    unknown = sorted(set(settings) - known)
    if unknown:
        sub.error(f"{path}: unknown options {unknown}{did_you_mean(unknown[0], known)}")
    for name in set(settings) - {"debug"}:
        try:
            settings[name] = yaml_value(schema, name, settings[name])
        except OptionError as error:
            sub.error(f"{path}: {error}")
    return settings


def parse_args(argv: Sequence[str] | None = None, choices: Choices | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` YAML values as defaults under the flags, and validate every option.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        choices: replaces the declared choices of the options it names (a registry's names).

    Raises:
        SystemExit: with status 2 after a one-line message, for a bad flag or file; 0 after ``--help``.
    """
    parser, commands = build_parser(choices)

    def parse() -> argparse.Namespace:
        options, unknown = parser.parse_known_args(argv)
        if unknown:  # named by the subcommand, whose flags the closest match comes from
            commands[options.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        return options

    options = parse()
    schema = COMMANDS[options.command].schema
    if options.config:
        sub = commands[options.command]
        sub.set_defaults(**_yaml_defaults(options.config, sub, schema))
        options = parse()
    try:
        validate(schema, vars(options), choices)
    except OptionError as error:
        commands[options.command].error(f"{f'{options.config}: ' if options.config else ''}{error}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``st-peft`` console script: parse here, then run the command in :func:`st_peft.cli.run`.

    Returns:
        0 on success or after ``--help``, 2 for a mistake in the input, 1 when training failed.
    """
    try:
        options = parse_args(argv)
    except SystemExit as error:  # --help, --version, or a refused option already printed in one line
        return error.code if isinstance(error.code, int) else USAGE_ERROR
    from st_peft.cli import run

    return run(options)
