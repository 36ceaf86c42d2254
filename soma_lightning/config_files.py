"""Reading YAML config files: YAML 1.2 floats, one-line errors naming the file, and the keys a command would
drop without a word. Light: nothing here imports the model code."""

import re
from collections.abc import Iterable
from typing import Any

import yaml

from soma_lightning.errors import SpecError


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.2 floats: `1e-5` is a float, not the string PyYAML's YAML 1.1 rules make it."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(path: str) -> Any:
    """The content of a YAML file; a SpecError naming the file when it cannot be read or parsed."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_SpecLoader)
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def _holds_nothing(value: Any) -> bool:
    return isinstance(value, dict) and all(_holds_nothing(v) for v in value.values())


def check_config_keys(path: str, dests: Iterable[str]) -> None:
    """A SpecError naming the first key of the config file `path` that the command does not take; `dests` are
    the dotted names of its arguments. jsonargparse reports such keys itself, except one whose value is a
    mapping with nothing in it (`modle: {arch: {}}`): that one it drops without a word."""
    values = {d for d in dests if d.rsplit(".", 1)[-1] != "help"}
    branches = {d.rsplit(".", k)[0] for d in values for k in range(1, d.count(".") + 1)}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in branches and isinstance(value, dict):
                walk(value, name + ".")
            elif name not in values and name not in branches and _holds_nothing(value):
                valid = sorted({n.removeprefix(prefix).split(".")[0] for n in values if n.startswith(prefix)})
                raise SpecError(f"{path}: {name}: unknown key; valid keys{' under ' + prefix[:-1] if prefix else ''}: {', '.join(valid)}")

    raw = read_yaml(path)
    if isinstance(raw, dict):
        walk(raw, "")
