"""A process supervisor: keeps N copies of a worker command running.

:class:`Supervisor` starts ``processes`` children, each running the same
command (``reflow worker APP --processes N`` re-executes itself, see
:mod:`reflow_core.cli.worker`), and restarts one that exits, after a backoff
that doubles with each crash in a row (a child that exits with status 0, told
to stop by someone else, is replaced too, and is no crash). A child that keeps
crashing stops the whole fleet: more than :attr:`RestartPolicy.max_crashes`
crashes within :attr:`RestartPolicy.window` seconds, counted over every child, and
:meth:`Supervisor.run` stops the others and returns 1.

``SIGTERM`` and ``SIGINT`` are forwarded to every child, which stops claiming,
lets its runs finish for the engine's ``drain_timeout`` and hands back the
rest; the supervisor waits ``stop_timeout`` seconds for them, then kills what
is left (its runs are taken over by other workers once their leases lapse).
It returns 0 when every child exited cleanly, 1 otherwise.

Every child gets ``REFLOW_WORKER_INDEX`` (1 to N) in its environment, so its
log lines say which worker slot it fills.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

__all__ = ["WORKER_INDEX_ENV", "RestartPolicy", "Supervisor"]

logger = logging.getLogger("reflow.supervisor")

WORKER_INDEX_ENV = "REFLOW_WORKER_INDEX"
"""The environment variable that tells a child its slot, 1 to N."""

_TICK = 0.05
"""Seconds between looks at the children."""
_FORWARDED = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that exited is started again, and when to give up.

    A child is restarted ``backoff`` seconds after it exited, doubling with
    each crash in a row of its slot up to ``max_backoff``; a child that ran
    for ``stable_after`` seconds or more starts the count over. More than
    ``max_crashes`` crashes (exits with a status other than 0) within
    ``window`` seconds, of all children together, is a crash loop: the
    supervisor stops.
    """

    max_crashes: int = 5
    window: float = 60.0
    backoff: float = 0.5
    max_backoff: float = 10.0
    stable_after: float = 30.0

    def delay(self, crashes_in_a_row: int) -> float:
        """Seconds to wait before starting a slot again after its n-th crash in a row."""
        exponent = max(crashes_in_a_row - 1, 0)
        return float(min(self.backoff * 2 ** min(exponent, 30), self.max_backoff))


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes_in_a_row: int = 0
    start_at: float = 0.0
    """When to start this slot's next child (monotonic seconds)."""


@dataclass
class _Signals:
    received: list[int] = field(default_factory=list)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Runs ``processes`` copies of ``command`` until told to stop.

    ``command`` is the argv of a child (``command[0]`` an executable);
    ``env`` its environment (default: this process's). ``stop_timeout`` is how
    long a child gets to drain and exit after the forwarded signal before it
    is killed.
    """

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        stop_timeout: float,
        policy: RestartPolicy | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.command = list(command)
        self.processes = processes
        self.stop_timeout = stop_timeout
        self.policy = policy or RestartPolicy()
        self.env = dict(os.environ if env is None else env)
        self._slots = [_Slot(index) for index in range(1, processes + 1)]
        self._crashes: list[float] = []
        self._signals = _Signals()

    # -- children -----------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        env = {**self.env, WORKER_INDEX_ENV: str(slot.index)}
        slot.proc = subprocess.Popen(self.command, env=env)  # noqa: S603
        slot.started_at = time.monotonic()
        logger.info(
            "worker %d/%d started (pid %d)",
            slot.index,
            self.processes,
            slot.proc.pid,
            extra={
                "reflow": {"event": "worker_started", "worker": slot.index, "child": slot.proc.pid}
            },
        )

    def _reap(self, slot: _Slot, now: float) -> bool:
        """Look at ``slot``'s child; if it exited, schedule its restart and
        return False when that makes a crash loop."""
        proc = slot.proc
        if proc is None:
            return True
        code = proc.poll()
        if code is None:
            return True
        slot.proc = None
        lived = now - slot.started_at
        if code == 0:
            # Stopped cleanly: someone asked this child alone to stop (to
            # recycle it, say). Not a crash; it is replaced after the backoff.
            slot.start_at = now + self.policy.backoff
            logger.info(
                "worker %d/%d (pid %d) exited cleanly after %.1fs; starting another",
                slot.index,
                self.processes,
                proc.pid,
                lived,
                extra={
                    "reflow": {
                        "event": "worker_exited",
                        "worker": slot.index,
                        "child": proc.pid,
                        "returncode": code,
                        "uptime": round(lived, 3),
                    }
                },
            )
            return True
        if lived >= self.policy.stable_after:
            slot.crashes_in_a_row = 0
        slot.crashes_in_a_row += 1
        self._crashes = [t for t in self._crashes if now - t <= self.policy.window]
        self._crashes.append(now)
        delay = self.policy.delay(slot.crashes_in_a_row)
        slot.start_at = now + delay
        fields = {
            "event": "worker_exited",
            "worker": slot.index,
            "child": proc.pid,
            "returncode": code,
            "uptime": round(lived, 3),
        }
        if len(self._crashes) > self.policy.max_crashes:
            logger.error(
                "worker %d/%d (pid %d) exited unexpectedly (%s) after %.1fs: %d exits within "
                "%gs is a crash loop; stopping",
                slot.index,
                self.processes,
                proc.pid,
                _describe(code),
                lived,
                len(self._crashes),
                self.policy.window,
                extra={"reflow": {**fields, "event": "crash_loop"}},
            )
            return False
        logger.warning(
            "worker %d/%d (pid %d) exited unexpectedly (%s) after %.1fs; restarting in %.1fs",
            slot.index,
            self.processes,
            proc.pid,
            _describe(code),
            lived,
            delay,
            extra={"reflow": {**fields, "restart_in": delay}},
        )
        return True

    def _forward(self, signum: int) -> None:
        for slot in self._slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signum)  # a no-op for a child that just exited

    def _stop_all(self, signum: int) -> bool:
        """Forward ``signum`` to every child, wait for them to drain, kill
        what outlives ``stop_timeout``. True if every child exited with 0."""
        self._forward(signum)
        deadline = time.monotonic() + self.stop_timeout
        clean = True
        forwarded = 1
        for slot in self._slots:
            proc = slot.proc
            if proc is None:
                continue
            while True:
                # A signal repeated while the children drain is passed on:
                # they are draining already and only log it.
                while len(self._signals.received) > forwarded:
                    self._forward(self._signals.received[forwarded])
                    forwarded += 1
                try:
                    code = proc.wait(min(_TICK, max(deadline - time.monotonic(), 0.0)))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() < deadline:
                        continue
                logger.error(
                    "worker %d/%d (pid %d) did not stop within %gs; killing it (its runs are "
                    "taken over once their leases lapse)",
                    slot.index,
                    self.processes,
                    proc.pid,
                    self.stop_timeout,
                    extra={"reflow": {"event": "worker_killed", "worker": slot.index}},
                )
                proc.kill()
                code = proc.wait()
                break
            slot.proc = None
            if code != 0:
                clean = False
            logger.info(
                "worker %d/%d (pid %d) stopped (%s)",
                slot.index,
                self.processes,
                proc.pid,
                _describe(code),
                extra={
                    "reflow": {
                        "event": "worker_stopped",
                        "worker": slot.index,
                        "child": proc.pid,
                        "returncode": code,
                    }
                },
            )
        return clean

    # -- the loop -------------------------------------------------------------

    def run(self) -> int:
        """Supervise until a forwarded signal or a crash loop; the exit code."""
        previous = {signum: signal.signal(signum, self._signals) for signum in _FORWARDED}
        try:
            return self._run()
        finally:
            for slot in self._slots:  # only after an error of the supervisor itself
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.kill()
                    slot.proc.wait()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run(self) -> int:
        logger.info(
            "supervising %d worker processes (pid %d)",
            self.processes,
            os.getpid(),
            extra={"reflow": {"event": "supervisor_started", "processes": self.processes}},
        )
        for slot in self._slots:
            self._start(slot)
        while not self._signals.received:
            now = time.monotonic()
            for slot in self._slots:
                if not self._reap(slot, now):
                    self._stop_all(signal.SIGTERM)
                    return 1
                if slot.proc is None and now >= slot.start_at and not self._signals.received:
                    self._start(slot)
            time.sleep(_TICK)
        signum = self._signals.received[0]
        name = signal.Signals(signum).name
        logger.info(
            "received %s; stopping %d workers (each drains, then hands back its runs)",
            name,
            sum(slot.proc is not None for slot in self._slots),
            extra={"reflow": {"event": "stopping", "signal": name}},
        )
        clean = self._stop_all(signum)
        logger.info(
            "all workers stopped%s",
            "" if clean else " (not all of them cleanly)",
            extra={"reflow": {"event": "supervisor_stopped", "clean": clean}},
        )
        return 0 if clean else 1
