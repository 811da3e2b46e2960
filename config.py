"""One command-line surface for every kiln script: a dataclass of defaults, then the command line.

    @dataclass
    class Args:
        ckpt: str | None = None      # checkpoint dir (default: the newest)
        shots: int = 0               # few-shot examples
    args = parse_args(Args(), sys.argv[1:], doc=__doc__)

Every script takes `--key=value` or `--key value`; a bare `--flag` turns a bool on; a list field
takes every argument up to the next `--key`. train.py also takes a Python config file first
(`config_file=True`), plain assignments as in nanoGPT. Values are type-checked against the default
(or the `X | None` annotation of a None default): an int where a float is expected is fine, a value
may contain `=`, and an unknown key is an error that names the closest known keys. `--help` prints
the script's docstring and every key with its default and the comment on its line in the dataclass.
Bottom floor: imports no other kiln module.
"""
import ast
import dataclasses
import difflib
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path


def _check(key, value, default, where):
    """value converted to the default's type, or an error naming the key, the type and the value."""
    if default is None:  # a None default without a single-type annotation: anything may replace it
        return value
    if isinstance(default, bool):
        if value in (0, 1) and not isinstance(value, float):  # True/False/1/0
            return bool(value)
    elif isinstance(default, float):
        # an int where a float is expected
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # max_iters=1e4
            return int(value)
    elif isinstance(default, list):
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, str):
            return [value]
    elif isinstance(value, type(default)):
        return value
    raise ValueError(f"config key {key}{where} expects {type(default).__name__} "
                     f"(default {default!r}), got {value!r}")


def _parse_value(key, raw, default):
    """A command-line string -> a Python value: text for a text key, as typed (--prompt "'hi'" keeps
    its quotes, --out_dir=2024 is the folder "2024"); else a literal when it parses, else the raw
    string where a string fits."""
    if isinstance(default, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if isinstance(default, list):
        return [raw]
    if isinstance(default, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None or isinstance(default, str):
            return raw
        raise ValueError(f"could not parse --{key}={raw}: expected a {type(default).__name__} "
                         f"literal like {default!r}") from None
    return value


def _prototype(default, hint):
    """What a value is checked against: the default, or for a None default annotated `int | None`
    (say) a stand-in of that type, so `--n_kv_head=abc` is refused while `--n_kv_head=2` and
    `--n_kv_head=None` pass."""
    if default is not None:
        return default
    kinds = [typing.get_origin(t) or t for t in typing.get_args(hint) if t is not type(None)]
    return kinds[0]() if len(kinds) == 1 and kinds[0] in (bool, int, float, str, list) else None


def _comments(cls):
    """{field: the comment on its line} from the dataclass's source, for --help."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, re.M)
    return {name: text.strip() for name, text in found}


def usage(defaults, doc=None):
    """The --help text: the docstring, then one line per key with its default and comment."""
    comments = _comments(type(defaults))
    lines = [doc.strip(), ""] if doc else []
    lines.append("options (--key=value or --key value):")
    for f in dataclasses.fields(defaults):
        value = repr(getattr(defaults, f.name))
        lines.append(f"  --{f.name:<22} {value:<20} {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def parse_args(defaults, argv=None, doc=None, config_file=False, positional=()):
    """defaults (a dataclass instance) + argv -> a new instance of the same type.

    config_file: a first argument that does not start with "--" is a Python config file (train.py).
    positional: field names filled, in order, by the arguments that do not start with "--".
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(usage(defaults, doc))
        raise SystemExit(0)
    hints = typing.get_type_hints(type(defaults))
    fields = [f for f in dataclasses.fields(defaults) if f.init]
    keys = {f.name: _prototype(getattr(defaults, f.name), hints.get(f.name)) for f in fields}
    nullable = {f.name for f in fields if getattr(defaults, f.name) is None}

    def checked(key, value, where):
        return value if value is None and key in nullable else _check(key, value, keys[key], where)

    def parsed(key, raw):   # a command-line string; "None" resets a key whose default is None
        if raw == "None" and key in nullable:
            return None
        return checked(key, _parse_value(key, raw, keys[key]), "")

    def known(key, where):
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = (f"did you mean {', '.join(close)}?" if close
                    else f"known keys: {', '.join(keys)}")
            raise ValueError(f"unknown config key {key!r}{where}; {hint}")

    values = {}
    if config_file and argv and not argv[0].startswith("--"):
        values.update(read_config_file(argv.pop(0), known, checked))
    free = list(positional)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            if not free:
                raise ValueError(f"unexpected argument {arg!r}: give options as --key=value or "
                                 "--key value"
                                 + " (a config file may only come first)" * config_file)
            key = free.pop(0)
            values[key] = parsed(key, arg)
            continue
        key, eq, raw = arg[2:].partition("=")  # split on the first '=' only: --prompt=a=b is "a=b"
        known(key, "")
        if eq:
            values[key] = parsed(key, raw)
        elif isinstance(keys[key], list):  # --input a b c: every argument up to the next --key
            items = []
            while i < len(argv) and not argv[i].startswith("--"):
                items.append(argv[i])
                i += 1
            if not items:
                raise ValueError(f"--{key} needs at least one value")
            values[key] = items
        elif isinstance(keys[key], bool) and (i == len(argv)
                                              or argv[i].lower() not in ("true", "false")):
            values[key] = True  # a bare --flag turns a bool on
        elif i < len(argv) and not argv[i].startswith("--"):   # --out_dir --max_iters=5: a slip
            values[key] = parsed(key, argv[i])
            i += 1
        else:
            raise ValueError(f"--{key} needs a value: write --{key}=VALUE")
    return dataclasses.replace(defaults, **values)


def read_config_file(path, known, checked):
    """A config file's assignments, each key known and type-checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass a file such as "
                                "config/demo.py")
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # plain assignments, like nanoGPT
    values = {}
    for key, value in namespace.items():
        # skip __builtins__ and modules (`import math`)
        if key.startswith("_") or isinstance(value, types.ModuleType):
            continue
        known(key, f" in {path}")
        values[key] = checked(key, value, f" in {path}")
    return values


def config_dict(cfg):
    """A config dataclass as a JSON-able dict (what gets printed and saved)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def print_config(cfg):
    for key, value in config_dict(cfg).items():
        print(f"{key:>26} = {value!r}")
