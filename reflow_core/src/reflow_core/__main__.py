"""``python -m reflow_core``: the ``reflow`` command (see :mod:`reflow_core.cli`)."""

from reflow_core.cli import main

if __name__ == "__main__":
    main()
