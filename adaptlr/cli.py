"""The ``adaptlr`` command: ``adaptlr conformance``, ``adaptlr bench``, ``adaptlr reproduce``.

Each subcommand lives with its own code and is imported only when asked for.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

_SUBCOMMANDS = {
    "conformance": ("adaptlr.conformance.cli", "cross-backend agreement and analytic checks, as a report"),
    "bench": ("adaptlr.backends.bench", "step time against the native optimizers and the bandwidth bound"),
    "reproduce": ("adaptlr.reproduce.cli", "small-scale reproductions of the papers' claims"),
}


def _usage() -> str:
    lines = ["usage: adaptlr {" + ",".join(_SUBCOMMANDS) + "} [options]", ""]
    lines += [f"  {name:12s} {help_}" for name, (_, help_) in _SUBCOMMANDS.items()]
    lines += ["", "adaptlr SUBCOMMAND --help shows the options of one."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in _SUBCOMMANDS:
        print(f"adaptlr: unknown subcommand {name!r}; valid: {', '.join(_SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(_SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
