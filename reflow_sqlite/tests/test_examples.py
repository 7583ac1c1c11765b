"""The README's demo runs and shows what it claims: a worker killed mid-step,
the run resumed elsewhere, the card charged exactly once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).parents[2] / "examples" / "order_demo.py"


@pytest.mark.slow
def test_order_demo(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(DEMO), "--db", str(tmp_path / "demo.db")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "worker 1 was killed by signal 9" in out
    assert ": completed, claimed 2 times, reclaimed 1" in out
    assert "the payment ledger has 1 charge(s)" in out
    for step in ("charge", "pack", "ship", "email"):
        assert f"step {step:<7} completed" in out


@pytest.mark.slow
def test_approval_flow() -> None:
    out = subprocess.run(
        [sys.executable, str(DEMO.with_name("approval_flow.py"))],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "big claim:     large claim audited: paid 1500 to ada" in out
    assert "small claim:   {'book': 'ledger entry for grace', 'pay': 'paid 40 to grace'}" in out
    assert "empty claim:   {'nothing_to_pay': True}" in out
    assert "failed at step 'record': PermissionError: rejected by manager" in out
    assert "'audit': 'skipped'" in out
    assert "failure handler: [\"edsger: claim failed at 'record': rejected by manager\"]" in out


@pytest.mark.slow
def test_later_and_in_time(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(DEMO.with_name("later_and_in_time.py")),
            "--db",
            str(tmp_path / "l.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith("reminder enqueued: delayed, due at ")
    assert out[1].startswith("review: no answer by ")
    assert out[1].endswith(": escalated to finance")
    assert out[2] == "reminder: reminded ada that the trial ends soon"
    waited = float(out[3].removeprefix("  started after ").removesuffix("s"))
    assert waited >= 0.9
    assert out[4] == "export: failed with deadline_exceeded at step 'export'"


@pytest.mark.slow
def test_map_reduce_urls(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(DEMO.with_name("map_reduce_urls.py")), "--db", str(tmp_path / "c.db")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    # Page n holds (n % 7 + 1) * 10 words: 40 pages, 1,550 words, page 6 the largest.
    assert out == [
        "fetched 40 pages, 1550 words in all",
        "largest page: 6",
        "40 page results saved as steps fetch[0] ... fetch[39]",
    ]


@pytest.mark.slow
def test_order_with_shipment(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(DEMO.with_name("order_with_shipment.py")),
            "--db",
            str(tmp_path / "o.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 6, out
    assert out[0].startswith("order ")
    parent = out[0].split()[1].rstrip(":")
    assert out[0] == f"order {parent}: waiting for child {parent}:ship:1:0 (shipment)"
    assert out[1] == "shipment: booked, waiting for the carrier's pick-up"
    assert out[2] == "order: order A-1 shipped, tracking PC-A-1"
    assert out[3] == f"shipment {parent}:ship:1:0: completed, parent {parent}"
    assert out[4] == "second order: failed at step 'ship' with reflow_core.errors.ChildFailedError"
    assert out[5].startswith("  child run ")
    assert out[5].endswith(
        ":ship:1:0 of workflow 'shipment' failed at step 'book': "
        "ValueError: no carrier delivers to 'nowhere in particular'"
    )
