"""Binds the conformance suite to the adapter inside this package's own tests."""

from pathlib import Path

import pytest
from reflow_tutorial_store import TutorialStorage

from reflow_conformance import AdapterFactory


@pytest.fixture(scope="session")
def reflow_storage_factory(tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    path: Path = tmp_path_factory.mktemp("store") / "contract.db"
    return AdapterFactory(
        make=lambda: TutorialStorage(str(path)),  # every call opens the same file
        # Another process rebuilds the adapter from this URL, through the entry
        # point: that is what declaring "multiprocess" promises.
        target=f"tutorial-sqlite:///{path}",
        capabilities=frozenset({"multiprocess"}),
        name="tutorial-sqlite",
    )
