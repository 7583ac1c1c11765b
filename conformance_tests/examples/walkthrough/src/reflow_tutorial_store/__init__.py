"""A Reflow storage adapter on the standard library's ``sqlite3``:
``tutorial-sqlite:///path/to/file.db``."""

from __future__ import annotations

from .storage import TutorialStorage

__all__ = ["TutorialStorage"]
