"""``reflow deploy-check APP``, run as a real subprocess against stores
holding runs of several versions, on every real backend: its report, its
JSON and its exit status; and ``reflow runs release`` on a held run.

The store is filled by engines built from ``shop_v1`` and ``shop_v3`` (the
code of two earlier deploys); the check loads the candidate deploys from
other modules, as CI would before shipping them.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from reflow_core import Engine
from reflow_core.versions import HOLD_EVENT

COMMON = """
from reflow_core import Engine, workflow

def handler(label):
    async def run(ctx):
        return label
    return run

def engine(*workflows):
    return Engine(storage="memory://", workflows=list(workflows), worker=False,
                  load_entry_points=False)
"""

APPS = {
    # What runs in production today, and an older build that enqueued a run of version 3.
    "shop_v1": """
ORDER = (workflow("order").step("charge", handler("charge")).wait_for_event("approved")
         .step("ship", handler("ship")))
app = engine(ORDER)
""",
    "shop_v3": """
ORDER = (workflow("order", version=3).step("charge", handler("charge"))
         .wait_for_event("approved").step("ship", handler("ship")))
app = engine(ORDER)
""",
    # Candidates: a rename without an alias; with one; an insertion with a policy.
    "rename": """
ORDER = (workflow("order", version=3).step("charge_card", handler("c"))
         .wait_for_event("approved").step("ship", handler("ship")))
app = engine(ORDER)
""",
    "alias": """
ORDER = (workflow("order", version=3).step("charge_card", handler("c"), was="charge")
         .wait_for_event("approved").step("ship", handler("ship")))
app = engine(ORDER)
""",
    "insert_held": """
ORDER = (workflow("order", version=3, on_incompatible="hold").step("charge", handler("c"))
         .step("fraud", handler("f")).wait_for_event("approved").step("ship", handler("s")))
app = engine(ORDER)
""",
    # A rollback to version 2: the run of version 3 has nowhere to go.
    "rollback": """
ORDER = (workflow("order", version=2).step("charge", handler("charge"))
         .wait_for_event("approved").step("ship", handler("ship")))
app = engine(ORDER)
""",
}


def _write_apps(directory: Path) -> None:
    for name, body in APPS.items():
        (directory / f"{name}.py").write_text(COMMON + textwrap.dedent(body), encoding="utf-8")


def _app(directory: Path, name: str) -> Any:
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))


async def _fill(url: str, directory: Path) -> dict[str, list[str]]:
    """Three runs of version 1 parked at their wait (charge saved), one of
    version 1 never started, one of version 3 never started."""
    v1 = _app(directory, "shop_v1").ORDER
    v3 = _app(directory, "shop_v3").ORDER
    ids: dict[str, list[str]] = {}
    async with Engine(storage=url, workflows=[v1], worker=False, load_entry_points=False) as e:
        ids["parked"] = [(await e.enqueue(v1, {"n": i})).id for i in range(3)]
        assert await e.tick() == 3
        ids["fresh"] = [(await e.enqueue(v1, {"n": 9})).id]
    async with Engine(storage=url, workflows=[v3], worker=False, load_entry_points=False) as e:
        ids["newer"] = [(await e.enqueue(v3, {"n": 10})).id]
    return ids


def _check(directory: Path, url: str, app: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "reflow_core",
            *extra,
            "deploy-check",
            f"{app}:app",
            "--url",
            url,
            "--app-dir",
            str(directory),
            "--examples",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.slow
def test_deploy_check_reports_what_each_candidate_does(store_url: str, tmp_path: Path) -> None:
    _write_apps(tmp_path)
    ids = asyncio.run(_fill(store_url, tmp_path))
    parked, fresh, newer = ids["parked"], ids["fresh"], ids["newer"]

    renamed = _check(tmp_path, store_url, "rename")
    assert renamed.returncode == 1, renamed.stderr
    out = renamed.stdout
    assert "order: deploying version 3" in out
    assert "on_incompatible not set" in out
    assert "5 run(s) in flight" in out
    rerun = next(line for line in out.splitlines() if "re-run !" in line)
    assert rerun.split()[:5] == ["1", rerun.split()[1], "re-run", "!", "3"]
    assert all(run_id in rerun for run_id in parked)
    assert "'charge_card' would run in its place" in " ".join(out.split())
    fresh_line = next(line for line in out.splitlines() if fresh[0] in line)
    assert "continue" in fresh_line
    assert "!" not in fresh_line
    same = next(line for line in out.splitlines() if newer[0] in line)
    assert same.split()[0] == "3"
    assert "continue" in same
    assert "FAIL: 3 of 5 run(s)" in out

    aliased = _check(tmp_path, store_url, "alias", "--json")
    assert aliased.returncode == 0, aliased.stdout + aliased.stderr
    report = json.loads(aliased.stdout)
    assert report["ok"] is True
    assert report["runs"] == 5
    assert report["unplanned"] == 0
    groups = {(g["version"], g["fate"]): g for g in report["groups"]}
    assert set(groups) == {(1, "continue"), (3, "continue")}
    assert groups[(1, "continue")]["runs"] == 4
    assert groups[(1, "continue")]["examples"]
    assert groups[(1, "continue")]["planned"]
    reasons = {f["reason"] for f in report["groups"]}
    assert "fits ('charge' as 'charge_card')" in reasons

    held = _check(tmp_path, store_url, "insert_held", "--json")
    assert held.returncode == 0, held.stdout + held.stderr
    groups = {(g["version"], g["fate"]): g for g in json.loads(held.stdout)["groups"]}
    assert groups[(1, "held")]["runs"] == 3
    assert groups[(1, "held")]["planned"] is True
    assert sorted(groups[(1, "held")]["examples"]) == sorted(parked)
    assert "'fraud' comes before where the run stands" in groups[(1, "held")]["reason"]

    rollback = _check(tmp_path, store_url, "rollback")
    assert rollback.returncode == 1
    line = next(line for line in rollback.stdout.splitlines() if newer[0] in line)
    assert "newer !" in line
    assert "version 3 is newer than the deployed 2" in line
    assert "FAIL: 1 of 5 run(s)" in rollback.stdout


@pytest.mark.slow
def test_a_held_run_is_shown_and_released_from_the_command_line(
    store_url: str, tmp_path: Path
) -> None:
    _write_apps(tmp_path)

    async def hold() -> str:
        ids = await _fill(store_url, tmp_path)
        run_id = ids["parked"][0]
        held_v = _app(tmp_path, "insert_held").ORDER
        async with Engine(
            storage=store_url, workflows=[held_v], worker=False, load_entry_points=False
        ) as engine:
            assert await engine.storage.deliver_event(run_id, "approved", "null")
            await engine.tick()
            record = await engine.storage.get_run(run_id)
            assert record is not None
            assert record.waiting_for == HOLD_EVENT
        return run_id

    run_id = asyncio.run(hold())
    base = [sys.executable, "-m", "reflow_core", "--url", store_url]
    shown = subprocess.run(
        [*base, "runs", "show", run_id], capture_output=True, text=True, timeout=60, check=False
    )
    assert shown.returncode == 0, shown.stderr
    lines = [" ".join(line.split()) for line in shown.stdout.splitlines()]
    assert any(line.startswith("version 1 (fingerprint ") for line in lines), lines
    held_line = next(line for line in lines if line.startswith("held "))
    assert "by version 3: step 'fraud' comes before where the run stands" in held_line
    assert f"(reflow runs release {run_id})" in held_line
    assert not any(line.startswith("waiting for") for line in lines)
    released = subprocess.run(
        [*base, "runs", "release", run_id, "missing-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert released.returncode == 1
    assert f"released {run_id}" in released.stderr
    assert "not held (or missing): missing-run" in released.stderr
    again = subprocess.run(
        [*base, "--json", "runs", "show", run_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    shown_json = json.loads(again.stdout)
    assert shown_json["held"] is True
    assert shown_json["version"] == 1
