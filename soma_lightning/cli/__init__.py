"""`soma-lightning COMMAND`: the command table.

fit, validate, test and predict are LightningCLI's (train.py). Every other command is a typed function in its
own module; jsonargparse reads its flags from the signature and their help from the docstring. Flags are
spelled as in the training commands (`--max_new_tokens`); `--max-new-tokens` is accepted too, and a bool
flag given alone means true (`--json`).
"""

import inspect as signature_of
import sys
from typing import Callable

import jsonargparse

from soma_lightning.cli import decode, evaluate, export, generate, graph, inspect, prepare, report, score, serve
from soma_lightning.cli.train import TRAINING_COMMANDS, cli_main
from soma_lightning.errors import SpecError, UserError

COMMANDS: dict[str, Callable[..., None]] = {
    "inspect": inspect.inspect, "export": export.export, "score": score.score, "generate": generate.generate,
    "graph": graph.graph, "report": report.report, "prepare": prepare.prepare, "decode": decode.decode,
    "evaluate": evaluate.evaluate, "serve": serve.serve,
}
POSITIONAL = {"report"}  # commands whose required arguments are positional: `soma-lightning report RUN_DIR`


def _summary(command: Callable) -> str:
    """The first paragraph of a command's docstring."""
    return " ".join((command.__doc__ or "").split("\n\n")[0].split())


def _spelled(args: list[str], command: Callable) -> list[str]:
    """`--a-b` as `--a_b`, and a bool flag given alone as `--flag true`."""
    parameters = signature_of.signature(command).parameters
    out: list[str] = []
    for i, arg in enumerate(args):
        name = arg[2:].replace("-", "_") if arg.startswith("--") and "=" not in arg else None
        if name not in parameters:
            out.append(arg)
            continue
        out.append(f"--{name}")
        alone = i + 1 == len(args) or args[i + 1].startswith("--")
        if parameters[name].annotation in (bool, bool | None) and alone:
            out.append("true")
    return out


def run_command(name: str, args: list[str]) -> None:
    command = COMMANDS[name]
    parser = jsonargparse.ArgumentParser(prog=f"soma-lightning {name}", description=_summary(command), exit_on_error=False)
    parser.add_function_arguments(command, as_positional=name in POSITIONAL)
    flags = parser.instantiate(parser.parse_args(_spelled(args, command)))  # dataclass flags: prepare's --data.*
    command(**{key: flags[key] for key in signature_of.signature(command).parameters})


def usage() -> str:
    rows = list(TRAINING_COMMANDS.items()) + [(name, _summary(command).split(": ")[0].split("; ")[0].rstrip(".")) for name, command in COMMANDS.items()]
    return "usage: soma-lightning COMMAND [--help] ...\n\ncommands (each has --help):\n" + "\n".join(f"  {name:<10} {text}" for name, text in rows)


def _user_error(e: BaseException | None) -> BaseException | None:
    """The user's mistake behind an exception: jsonargparse wraps errors raised while instantiating classes."""
    while e is not None:
        if isinstance(e, (UserError, jsonargparse.ArgumentError)):
            return e
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """The `soma-lightning` entry point: a user's mistake ends in one line on stderr and exit status 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in COMMANDS:
            run_command(args[0], args[1:])
        elif not args or args[0] in ("-h", "--help"):
            print(usage())
        else:
            cli_main(argv)
    except Exception as e:
        cause = _user_error(e)
        if cause is None:
            raise
        message = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
        configs = [value for flag, value in zip(args, args[1:]) if flag in ("--config", "-c")]
        if isinstance(cause, SpecError) and configs and not message.startswith(tuple(configs)):
            message += f" (in {' + '.join(configs)})"
        print(f"soma-lightning: error: {message}", file=sys.stderr)
        sys.exit(2)
