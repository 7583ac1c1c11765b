"""Testing a workflow with the virtual-clock test engine.

    python -m pytest examples/test_approval_flow.py

The `reflow_test_engine` fixture comes with reflow-core. The expense claim of
`approval_flow.py` sleeps and waits for an approval; here time is moved by
the test, so it runs in milliseconds.
"""

from __future__ import annotations

from approval_flow import Claim, expenses

from reflow_core.testing import SyncTestEngine


def test_a_large_claim_is_paid_and_audited_once_approved(
    reflow_test_engine: SyncTestEngine,
) -> None:
    t = reflow_test_engine
    result = t.run(expenses, Claim("ada", 1500))
    assert result.status == "sleeping"  # the cooling-off period
    assert result.step("check").output == {"amount": 1500}

    t.advance("300ms")
    result = t.drive(result.id)
    assert result.status == "waiting"
    assert "approval" in (result.blocked_reason or "")

    result = t.send_event(result.id, "approval", {"approved": True, "by": "finance"})
    assert result.status == "completed"
    assert result.output == "large claim audited: paid 1500 to ada"
    assert result.step("pay").output == "paid 1500 to ada"


def test_a_claim_without_approval_times_out(reflow_test_engine: SyncTestEngine) -> None:
    t = reflow_test_engine
    result = t.run(expenses, Claim("grace", 40), advance=True)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error["code"] == "wait_timeout"


def test_an_empty_claim_completes_early(reflow_test_engine: SyncTestEngine) -> None:
    result = reflow_test_engine.run(expenses, Claim("alan", 0))
    assert result.status == "completed"
    assert result.output == {"nothing_to_pay": True}
    assert "cooling-off" not in result.steps
