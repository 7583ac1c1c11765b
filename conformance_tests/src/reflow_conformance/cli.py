"""``reflow-conformance``: run the storage contract against an adapter.

    reflow-conformance --storage my_pkg.testing:factory [--thorough] [PYTEST ARGS...]
    reflow-conformance --url sqlite:///tmp/contract.db [--keep]
    reflow-conformance --storage my_pkg.testing:factory --without schedules

It is ``pytest --pyargs reflow_conformance.suite`` with the adapter options
filled in; anything after the options goes to pytest unchanged (``-x``,
``-k claims``, ``-n`` ...). With ``--url`` the suite works in a fresh store
of its own inside the one named (see :mod:`reflow_conformance.stores`) and
drops it at the end, unless ``--keep`` keeps it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from .harness import AREAS, CAPABILITIES
from .stores import StoreUsageError, check_usable

__all__ = ["main"]


def build_args(argv: list[str]) -> list[str]:
    """Translate the command line into pytest's arguments."""
    parser = argparse.ArgumentParser(
        prog="reflow-conformance",
        description="Run the Reflow storage conformance suite against an adapter.",
        epilog="Arguments not listed here are passed to pytest.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--storage",
        metavar="MODULE:FACTORY",
        help="a zero-argument callable returning a new storage (or an AdapterFactory)",
    )
    target.add_argument("--url", metavar="URL", help="a storage URL for reflow_core.open_storage")
    parser.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="NAME",
        choices=sorted(CAPABILITIES),
        help=f"declare an optional capability of the adapter ({', '.join(CAPABILITIES)})",
    )
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="AREA",
        choices=sorted(AREAS),
        help="declare an area of the contract the adapter does not implement yet; "
        f"its tests are skipped ({', '.join(AREAS)})",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="with --url: keep the fresh store the suite works in (a Redis key prefix, a "
        "PostgreSQL schema, a SQLite file) instead of dropping it at the end, and say where",
    )
    parser.add_argument(
        "--thorough",
        action="store_true",
        help="use the reflow-thorough Hypothesis profile (many more examples)",
    )
    options, rest = parser.parse_known_args(argv)
    if options.url:
        try:
            check_usable(options.url)
        except StoreUsageError as error:
            parser.error(str(error))
    args = ["--pyargs", "reflow_conformance.suite", "-p", "no:cacheprovider"]
    if options.storage:
        args.append(f"--reflow-storage={options.storage}")
    else:
        args.append(f"--reflow-storage-url={options.url}")
    args += [f"--reflow-capability={name}" for name in options.capability]
    args += [f"--reflow-without={name}" for name in options.without]
    if options.keep:
        args.append("--reflow-keep")
    if options.thorough:
        args.append("--hypothesis-profile=reflow-thorough")
    return args + rest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reflow-conformance`` command.

    pytest runs in a fresh interpreter, so it imports the plugin itself and
    can rewrite its assertions (this process has imported the package already).
    """
    args = build_args(sys.argv[1:] if argv is None else argv)
    return subprocess.call([sys.executable, "-m", "pytest", *args])  # noqa: S603 - our own pytest


if __name__ == "__main__":
    raise SystemExit(main())
