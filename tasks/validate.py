"""Every option and config file a command will use, checked before its first stage runs.

`nox -s m40` checks the inputs of all its stages up front, so a broken `--channels-file` is reported
(exit 2) on a machine whose probe would fail first; a stage run alone checks its own. Each check
raises ConfigError (one line: the file or option, what is wrong, the fix). The checks are the stages'
own (a stage module's optional check_inputs(args), using the loaders of tasks.config): this module
adds no second parser of a file, only what no loader checks (numbers that are not finite).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from pathlib import Path

import yaml

from tasks import config, layout
from tasks.config import ConfigError
from training_pt import configurator


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (the option, the problem, where the help is) and exit 2,
    not the whole usage block."""

    def error(self, message: str):
        self.exit(layout.EXIT_USAGE, f"{self.prog} error: {message}; see `{self.prog} --help`\n")


def inputs(args, stages, modules) -> None:
    """Check the inputs of `stages` (modules[name] is a stage's module; its optional
    check_inputs(args) raises ConfigError, exit 2, on the first problem)."""
    for name in stages:
        if (check := getattr(modules[name], "check_inputs", None)) is not None:
            check(args)


def train_options(args) -> None:
    """The train stage's inputs: its config file (readable YAML, every number finite), its overrides, both
    checked by training_pt/configurator.py as train.py checks them, and its options."""
    path = Path(args.train_config)
    if not path.is_file():
        raise ConfigError(f"--train-config {path} is not a file; pass an existing YAML file")
    non_finite(config.load_yaml(path), str(path))
    for item in args.train_override:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--train-override {item!r} is not KEY=VALUE; write e.g. train.steps=20")
        if not is_finite_text(text):
            raise ConfigError(f"--train-override {item!r}: {text.strip()} is not a finite number; give a real value")
    try:  # the training script's own loader (torch-free): unknown keys, types, choices, ranges
        configurator.load_config(path, args.train_override)
    except configurator.TrainError as e:
        raise ConfigError(f"{e}; fix --train-config or --train-override") from None
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: must be 1 or more (or drop it: one process per GPU)")
    if not (math.isfinite(args.train_timeout) and args.train_timeout > 0):
        raise ConfigError(f"--train-timeout {args.train_timeout}: must be a positive number of seconds")


def is_finite_text(text: str) -> bool:
    """False for text that reads as a number that is not finite, as Python (nan, inf, 1e999) or as YAML
    (.nan, .inf) reads it; True otherwise (text that is no number is the stage's to judge)."""
    values = []
    with contextlib.suppress(ValueError):
        values.append(float(text))
    with contextlib.suppress(yaml.YAMLError):
        values.append(yaml.safe_load(text))
    return not any(isinstance(v, float) and not math.isfinite(v) for v in values)


def non_finite(data, where: str, key: str = "") -> None:
    """ConfigError naming the first number in `data` (nested mappings and lists) that is nan or infinite."""
    if isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"{where}: {key}: {data} is not a finite number; give a real value")
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, value in items:
        non_finite(value, where, f"{key}.{k}" if key else str(k))


# --------------------------------------------------------------------------- nox's own -p

PYTHON_FLAGS = (
    "-p",
    "--python",
    "--pythons",
    "-P",
    "--force-python",
    "--force-pythons",
    "--extra-python",
    "--extra-pythons",
)


FORCED_PYTHON_FLAGS = ("-P", "--force-python", "--force-pythons", "--extra-python", "--extra-pythons")


def forced_python_refusal(argv: list[str]) -> str | None:
    """One line refusing nox's -P/--force-python/--extra-python (before `--`): they add the value to every
    session's pythons, and a session here runs in no interpreter of nox's (install's python is its channel)."""
    for name in ("NOXFORCEPYTHON", "NOXEXTRAPYTHON"):  # nox reads these as -P and --extra-python
        if os.environ.get(name):
            return (
                f"nox: {name} is not for this project: its sessions run in no interpreter of nox's; unset it, "
                "and name a channel with nox -s install -p CHANNEL"
            )
    for arg in argv:
        if arg == "--":
            return None
        flag = arg.split("=", 1)[0]
        if flag in FORCED_PYTHON_FLAGS or (arg.startswith("-P") and not arg.startswith("--")):
            return (
                f"nox: {flag if flag in FORCED_PYTHON_FLAGS else '-P'} is not for this project: its sessions run in "
                "no interpreter of nox's; name a channel with nox -s install -p CHANNEL"
            )
    return None


def python_args(argv: list[str]) -> list[str]:
    """The values given to nox's -p/--python (and -P, --extra-python) on its command line: channel names here."""
    out: list[str] = []
    taking = False
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("-"):
            flag, eq, value = arg.partition("=")
            taking = flag in PYTHON_FLAGS and not eq
            if flag in PYTHON_FLAGS and eq:
                out.append(value)
            elif arg.startswith("-p") and not arg.startswith("--") and len(arg) > 2:
                out.append(arg[2:])  # -pcu128
        elif taking:
            out.append(arg)
    return [v for value in out for v in value.split(",") if v]


def bare_install(argv: list[str], channels: list[str]) -> bool:
    """`nox -s install`, or a `nox -k` expression that selects more than one install(<channel>) session, without
    a channel (-p NAME, or any other spelling of nox's -p: python_args): nox would run those sessions in turn,
    each replacing .venv-gpu."""
    selected: list[str] = []  # session names (-s a,b), split at commas
    keywords: list[str] = []  # -k expressions, whole
    taking = ""  # which of the two the next plain word belongs to ("": neither)
    for a in argv:
        if a == "--":
            break
        if a in ("-s", "--session", "--sessions", "-e"):
            taking = "sessions"
        elif a in ("-k", "--keywords"):
            taking = "keywords"
        elif a.startswith(("--session=", "--sessions=")):
            selected += a.split("=", 1)[1].split(",")
        elif a.startswith("--keywords="):
            keywords.append(a.split("=", 1)[1])
        elif a.startswith("-"):
            taking = ""
        elif taking == "sessions":
            selected += a.split(",")
        elif taking == "keywords":
            keywords.append(a)
    several = any(sum(keyword_selects(k, ("install", f"install({c})")) for c in channels) > 1 for k in keywords)
    return ("install" in selected or several) and not python_args(argv)


class KeywordNames(dict):
    """A name in a -k expression is true when it is part of one of the session's keywords (its name and
    signature, install and install(cu128)), as nox reads it."""

    def __init__(self, keywords: tuple[str, ...]):
        super().__init__()
        self.keywords = keywords

    def __missing__(self, name: str) -> bool:
        return any(name in k for k in self.keywords)


def keyword_selects(expression: str, keywords: tuple[str, ...]) -> bool:
    """Whether nox's `-k expression` selects a session with these keywords (`not install`, `lint`: no)."""
    try:
        return bool(eval(expression, {"__builtins__": {}}, KeywordNames(keywords)))  # noqa: S307 (nox does so)
    except Exception:  # nox refuses such an expression itself
        return False


def bare_install_refusal(names: list[str]) -> str:
    """What `nox -s install` without -p is told: the channels to name, or why the catalog has none to offer."""
    if not names:
        try:
            config.load_channels()
        except ConfigError as e:
            return f"nox: name one channel with -p, but the channel catalog cannot be read: {e}"
    return f"nox: name one channel: nox -s install -p CHANNEL (one of {', '.join(names)})"


def unknown_channels(argv: list[str], names: list[str]) -> str | None:
    """One line refusing the channel names given with -p that the catalog lacks; None when all are known."""
    unknown = [v for v in python_args(argv) if v not in names]
    if not unknown:
        return None
    if not names:
        try:
            config.load_channels()
        except ConfigError as e:
            return f"nox: cannot read the channel catalog: {e}"
    return (
        f"nox: unknown channel {', '.join(unknown)} for -p; the channels of {config.channels_file()}: "
        f"{', '.join(names)}"
    )
