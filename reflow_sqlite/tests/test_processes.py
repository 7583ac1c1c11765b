"""A process that never closes its storage still exits.

Processes sharing one database file, claiming runs and running engines (one
of them killed mid-step), are the conformance suite's ``TestProcesses`` and
``TestProcessCrash``, which run on SQLite with the rest of the suite
(``conformance_tests/tests``).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path


def test_a_process_that_never_closes_the_storage_still_exits(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from reflow_core.storage import NewRun\n"
        "from reflow_sqlite import SQLiteStorage\n"
        "store = SQLiteStorage(sys.argv[1])\n"
        "async def main():\n"
        "    await store.initialize()\n"
        "    await store.create_run(NewRun('wf', '{}'))\n"
        "asyncio.run(main())\n"
    )
    db = tmp_path / "left-open.db"
    done = subprocess.run(
        [sys.executable, "-c", script, str(db)], capture_output=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    finally:
        raw.close()
    assert os.path.getsize(db) > 0
