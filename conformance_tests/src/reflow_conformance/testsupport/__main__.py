"""``python -m reflow_conformance.testsupport work|enqueue ...``: the crash worker."""

from __future__ import annotations

from ._worker import main

if __name__ == "__main__":
    raise SystemExit(main())
