"""Reading a config: YAML files that build on others (``base:``), and parse errors told in one line.

jsonargparse reports a bad value over several lines (every type of a union tried, in Python's
spelling) and a misspelt key with the parser's usage; a user needs the key, the value, what is
allowed, and the closest valid key.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace, get_loader
from lightning.pytorch.cli import LightningArgumentParser

from moei_lightning.errors import USER_ERROR_EXIT, ConfigError

FULL_PARSE_ERRORS: ContextVar[bool] = ContextVar("moei_full_parse_errors", default=False)
"""Set for a run with ``--debug``: the parser's errors keep jsonargparse's whole message and usage."""


class MoEIArgumentParser(LightningArgumentParser):
    """Reads config files with a ``base:`` list; answers a misspelt key in one line, with the closest valid key."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --data.batch_siz is a misspelling, not --data.batch_size
        super().__init__(*args, **kwargs)

    def parse_path(
        self,
        path: str | os.PathLike,
        ext_vars: dict | None = None,
        env: bool | None = None,
        defaults: bool = True,
        **kwargs: Any,
    ) -> Namespace:
        """A file that lists ``base:`` files is parsed as those files with its own keys merged over them."""
        source = Path(os.fspath(path))
        if not source.is_file() or BASE_KEY not in _load_mapping(source):
            return super().parse_path(path, ext_vars=ext_vars, env=env, defaults=defaults, **kwargs)
        merged = yaml.safe_dump(resolve_bases(source), sort_keys=False, allow_unicode=True)
        return self.parse_string(merged, path=source.name, ext_vars=ext_vars, env=env, defaults=defaults, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """One ``error:`` line instead of the usage and the parser's type dump (``--debug`` keeps them)."""
        if not self.exit_on_error or FULL_PARSE_ERRORS.get():
            super().error(message, ex)
        key = misspelt_key(message)
        if key is None:
            sys.stderr.write(f"error: {describe_parse_error(message)}\n")
            raise SystemExit(USER_ERROR_EXIT)
        keys = list(self.get_defaults().keys())  # nested: model.molora.num_experts
        closest = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"; did you mean '{closest[0]}'?" if closest else f"; `{self.prog} --help` lists the keys"
        sys.stderr.write(f"error: unknown config key '{key}'{hint}\n")
        raise SystemExit(USER_ERROR_EXIT)


BASE_KEY = "base"
"""Top-level key of a config file: the files it builds on, relative to it, merged in order beneath it."""


def resolve_bases(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The config file at ``path`` as one mapping: its ``base:`` files first (in order), its own keys over them.

    ``base: tiny.yaml`` (or a list) names files relative to the file that lists them; they may have bases
    of their own. The result is what ``--config BASE --config FILE`` gives: see :func:`merge_configs`.
    """
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(path) :], path))
        raise ConfigError(f"{_chain[-1]}: base: the files include each other ({cycle}); remove one of the links")
    config = _load_mapping(path)
    bases = config.pop(BASE_KEY, None)
    if bases is None:
        return config
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: base: must be a file name or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(
                f"{path}: base: {base}: no such file ({base_path}); base files are relative to the file that lists them"
            )
        merged = merge_configs(merged, resolve_bases(base_path, (*_chain, path)))
    return merge_configs(merged, config)


def merge_configs(base: Any, overlay: Any) -> Any:
    """``overlay`` over ``base``: mappings merge key by key, anything else (a list too) replaces.

    A mapping with another ``class_path`` than the base's is a different object and replaces it whole,
    so a strategy file that switches FSDP2 for DDP does not inherit FSDP2's ``init_args``.
    """
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return overlay
    if "class_path" in overlay and overlay["class_path"] != base.get("class_path"):
        return overlay
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = merge_configs(base[key], value) if key in base else value
    return merged


def _load_mapping(path: Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping, read as jsonargparse reads it (``1e-4`` is a float)."""
    try:
        config = get_loader("yaml")(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({one_line(str(err))})") from err
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config file holds a mapping of keys, got {type(config).__name__}")
    return config


_MISSPELT = (
    re.compile(r"Group '([\w.]+)' does not accept option '([\w.]+)'"),
    re.compile(r"unrecognized arguments: --([\w.]+)"),
    re.compile(r"does not accept option '([\w.]+)'"),
    re.compile(r"Parser key \"([\w.]+)\":.*?Option '([\w.]+)' is not accepted", re.DOTALL),
)


def misspelt_key(message: str) -> str | None:
    """The unknown key a jsonargparse error message is about, or None for other errors."""
    for pattern in _MISSPELT:
        match = pattern.search(message)
        if match:
            return ".".join(match.groups())
    return None


_PARSER_KEY = re.compile(r'Parser key "([\w.]+)":')
_VALUE = re.compile(r"(?:Given|Got) value: (.*?)(?:\. Got value: .*)?$", re.MULTILINE)
_EXPECTED = re.compile(r"Expected a (<class '(\w+)'>|typing\.Literal\[(.*?)\]|path)")
_TYPE_NAMES = {
    "int": "an integer",
    "float": "a finite number",
    "bool": "true or false",
    "str": "a string",
    "NoneType": "null",
}


def describe_parse_error(message: str) -> str:
    """A jsonargparse type or choice error as one line: the key, the value given and what is allowed.

    jsonargparse reports such errors over several lines (every type of a union tried, in Python's
    spelling); a user needs the key, the value and the allowed values or type.
    """
    keys = _PARSER_KEY.findall(message)
    missing_file = re.search(r"File does not exist: '(.*)'", message)
    if keys and missing_file:
        return f"--{keys[0]} {missing_file.group(1)}: no such file"
    if not keys:
        return one_line(message)
    key = keys[0] if len(keys) == 1 else f"{keys[0]}.init_args.{keys[-1]}"
    value = _VALUE.search(message)
    allowed: list[str] = []
    choices: list[str] = []
    for match in _EXPECTED.finditer(message):
        if match.group(3) is not None:
            choices += [choice.strip() for choice in match.group(3).split(",")]
        else:
            allowed.append(_TYPE_NAMES.get(match.group(2), match.group(2)) if match.group(2) else "a path")
    if choices:
        allowed.insert(0, f"one of {', '.join(dict.fromkeys(choices))}")
    if len(allowed) > 1:  # a tensor's import path, tried last for a float (an optimizer's lr): not a user's choice
        allowed = [kind for kind in allowed if kind != "a path"]
    if not allowed:
        return f"config key {key}: {one_line(message.split(':', 1)[1])}"
    got = f", got {value.group(1).strip()!r}" if value else ""
    return f"config key {key}: expected {' or '.join(dict.fromkeys(allowed))}{got}"


def one_line(text: str) -> str:
    return " ".join(text.split())
