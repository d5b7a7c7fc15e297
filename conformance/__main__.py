"""``python -m adaptlr.conformance``: the same as ``adaptlr conformance``."""

from adaptlr.conformance.cli import main

raise SystemExit(main())
