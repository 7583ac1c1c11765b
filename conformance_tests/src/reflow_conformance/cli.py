"""``reflow-conformance``: run the storage contract against an adapter.

    reflow-conformance --storage my_pkg.testing:factory [--thorough] [PYTEST ARGS...]
    reflow-conformance --url sqlite:///tmp/contract.db
    reflow-conformance --storage my_pkg.testing:factory --without schedules

It is ``pytest --pyargs reflow_conformance.suite`` with the adapter options
filled in; anything after the options goes to pytest unchanged (``-x``,
``-k claims``, ``-n`` ...).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from .harness import AREAS, CAPABILITIES

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
        "--thorough",
        action="store_true",
        help="use the reflow-thorough Hypothesis profile (many more examples)",
    )
    options, rest = parser.parse_known_args(argv)
    args = ["--pyargs", "reflow_conformance.suite", "-p", "no:cacheprovider"]
    if options.storage:
        args.append(f"--reflow-storage={options.storage}")
    else:
        args.append(f"--reflow-storage-url={options.url}")
    args += [f"--reflow-capability={name}" for name in options.capability]
    args += [f"--reflow-without={name}" for name in options.without]
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
