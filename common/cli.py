"""The one command-line style of every entry point:

    PROG [--config FILE.yaml] [--print-config] [--debug] [key=value ...]

The config is the entry point's dataclass schema, loaded by `common.config.load_config` (defaults, then the
YAML file, then the overrides). `--help` lists every key with its value (the defaults, or the file's with
`--config`) and the comment beside the field in the schema's source; `--print-config` prints the resolved
config as YAML and exits. Expected failures (bad input, a bad run folder, a damaged file) print one line and
exit with a code: `config error: ...` (2) for the config, `error: ...` for the errors the entry point names (2,
or its own code); `--debug` (or TUBELET_DEBUG=1) shows their tracebacks too. Anything else is a bug and keeps
its traceback. Log lines go to the console through `common.logs`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Type

import yaml
from omegaconf import OmegaConf

from common import logs
from common.config import ConfigError, load_config, merged, to_yaml


def main_for(schema: Type, run: Callable[[Any], Any], argv: Optional[Sequence[str]] = None, *, prog: str,
             doc: str = "", errors: Mapping[Type[BaseException], int] = (), flags: Mapping[str, str] = ()) -> int:
    """Parse `argv` in the one style, build the config, call `run(cfg)`; returns the process exit code.

    errors: the entry point's expected failures and their exit codes (printed as one `error:` line).
    flags: options that stand for a key, e.g. {"--json": "json"}: `--json F` and `--json=F` mean `json=F`."""
    args, given = [], iter(sys.argv[1:] if argv is None else argv)
    for a in given:
        flag, eq, value = a.partition("=")
        if flag in dict(flags):
            a = f"{dict(flags)[flag]}={value if eq else next(given, '')}"
        args.append(a)
    path, overrides, show, want_help = None, [], False, False
    debug = os.environ.get("TUBELET_DEBUG", "") not in ("", "0")
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            want_help = True
        elif a == "--print-config":
            show = True
        elif a == "--debug":
            debug = True
        elif a == "--config" or a.startswith("--config="):
            if a == "--config":
                i += 1
                if i == len(args):
                    return _usage_error(prog, "--config needs a YAML file")
                path = args[i]
            else:
                path = a.split("=", 1)[1]
        elif a.startswith("-"):
            return _usage_error(prog, f"unknown option {a!r}")
        else:
            overrides.append(a)
        i += 1
    try:
        if want_help:
            print(help_text(schema, prog, doc, path))
            return 0
        cfg = load_config(schema, path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    if show:
        print(to_yaml(cfg), end="")
        return 0
    expected = {ConfigError: 2, **dict(errors)}
    logs.console()
    try:
        run(cfg)
    except tuple(expected) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return next(code for kind, code in expected.items() if isinstance(e, kind))
    return 0


def _usage(prog: str) -> str:
    return f"usage: {prog} [--config FILE.yaml] [--print-config] [--debug] [key=value ...]"


def _usage_error(prog: str, what: str) -> int:
    print(f"{prog}: {what}\n{_usage(prog)}  (--help lists the keys)", file=sys.stderr)
    return 2


def help_text(schema: Type, prog: str, doc: str = "", path: Optional[str] = None) -> str:
    """Usage, the entry point's description, and every key with its value and the schema's comment."""
    values = OmegaConf.to_container(merged(schema, path), resolve=True)
    rows = list(_rows(schema, values, ""))
    width = min(max((len(f"{k} = {v}") for k, v, _ in rows), default=0), 40)
    lines = [_usage(prog), ""]
    if doc:
        lines += [doc.strip(), ""]
    lines.append(f"keys ({'values from ' + str(path) if path else 'defaults'}; override any as key=value, "
                 "lists as key=[a,b], list items as key.0.field=value):")
    for key, value, comment in rows:
        entry = f"{key} = {value}"
        lines.append(f"  {entry:<{width}}  # {comment}" if comment else f"  {entry}")
    return "\n".join(lines)


def _rows(schema: Type, values: Dict[str, Any], prefix: str):
    comments = field_comments(schema)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value = values.get(f.name)
        hint = hints.get(f.name)
        if dataclasses.is_dataclass(hint):
            yield from _rows(hint, value, f"{prefix}{f.name}.")
            continue
        yield f"{prefix}{f.name}", _flow(value), comments.get(f.name, "")


def _flow(value: Any) -> str:
    """A value as it would be written on the command line (YAML flow style)."""
    if isinstance(value, str):
        return repr(value) if value == "" or value.strip() != value else value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...")


_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s?(.*))?$")


def field_comments(schema: Type) -> Dict[str, str]:
    """`name -> comment` from the schema's source: the `# ...` text beside each field, or else the comment
    lines right above it."""
    try:
        lines = inspect.getsource(schema).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(schema)}
    out: Dict[str, str] = {}
    above: List[str] = []
    in_doc = False
    for line in lines:
        text = line.strip()
        if line.count('"""') % 2:
            in_doc = not in_doc
            continue
        if in_doc:
            continue
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m and m.group(1) in names and m.group(1) not in out:
            out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return out
