"""Script replies decoded into records, and steps encoded as script arguments.

A run is a hash whose short field names the scripts write (``st`` status,
``wf`` workflow, ``in``/``out``/``err``, ``att``/``rec``/``ep`` counters,
``c``/``u``/``w``/``l``/``dl`` times in epoch microseconds (``dl`` the run's
deadline, absent without one), ``wt`` the awaited event, ``idem`` the
idempotency key, ``id`` the run's own id, ``pa``/``ps`` a child run's parent
and the parent's step that started it, absent for other runs; ``pr`` the
priority, absent for 0; ``k1``/``m1`` and ``k2``/``m2`` the concurrency
limits' keys and maxima, ``rk1``/``rm1``/``rp1`` and ``rk2``/``rm2``/``rp2``
the rate limits' keys, maxima and periods (µs), absent without; ``bb`` the
key blocking a blocked run; ``db`` the debounce key, absent without; ``hd``
the propagation headers as one JSON object, absent without; ``es`` how many
events were buffered for the run, absent before the first; ``v`` the
workflow version, absent for 1; ``fp`` the fingerprint, absent without); a
step is one
field of the run's steps hash, ``seq|done|status|wake|json``. Anything under
the prefix that does not read this way raises :class:`_BadData`, which the
storage reports as a :class:`~reflow_core.errors.StorageError` naming the
operation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import Any, cast, get_args

from reflow_core.adapter import (
    decode_workflows,
    from_epoch_us,
    headers_column,
    headers_from_column,
    is_delayed,
    limit_columns,
    limits_from_columns,
    rate_columns,
    rates_from_columns,
    span_us,
    to_epoch_us,
)
from reflow_core.errors import StorageError
from reflow_core.storage import (
    ClaimedRun,
    Lease,
    NewRun,
    RunRecord,
    RunStatus,
    ScheduleRecord,
    StepRecord,
    StepStatus,
    WorkerRecord,
)

_RUN_STATUSES = frozenset(get_args(RunStatus))
"""Every status a stored run may hold."""


class _BadData(Exception):
    """Something under our prefix is not what Reflow writes."""


def _text(value: object, where: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _BadData(f"{where} is not UTF-8 text") from exc
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    raise _BadData(f"{where} has an unexpected type {type(value).__name__}")


def _time(value: str | None, where: str) -> datetime | None:
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise _BadData(f"{where} is not a time")
    try:
        micros = int(value)
    except ValueError:  # more digits than int() takes: far past year 9999
        return from_epoch_us(2**63)
    return from_epoch_us(micros)


def _pairs(flat: Sequence[object], where: str) -> dict[str, str]:
    if not isinstance(flat, list | tuple) or len(flat) % 2:
        raise _BadData(f"{where} is not a hash")
    return {_text(flat[i], where): _text(flat[i + 1], where) for i in range(0, len(flat), 2)}


def _int(fields: Mapping[str, str], name: str, where: str) -> int:
    value = fields.get(name, "")
    if not value.lstrip("-").isdigit():
        raise _BadData(f"{where} field {name!r} is not an integer")
    return int(value)


def _flat(reply: Any) -> list[object]:
    """An ``HGETALL`` reply as a flat list (RESP3 answers with a dict)."""
    if isinstance(reply, dict):
        return [item for pair in reply.items() for item in pair]
    return list(reply)


def _run_record(run_id: str, fields: Mapping[str, str]) -> RunRecord:
    where = f"run {run_id!r}"
    try:
        status = fields["st"]
        if status not in _RUN_STATUSES:
            raise _BadData(f"{where} has an unknown status {status!r}")
        created = _time(fields["c"], where)
        updated = _time(fields["u"], where)
        if created is None or updated is None:
            raise _BadData(f"{where} lacks its creation or update time")
        return RunRecord(
            id=run_id,
            workflow=fields["wf"],
            status=cast(RunStatus, status),
            input=fields["in"],
            output=fields.get("out"),
            error=fields.get("err"),
            idempotency_key=fields.get("idem") or None,
            attempts=_int(fields, "att", where),
            reclaims=_int(fields, "rec", where),
            lease_epoch=_int(fields, "ep", where),
            created_at=created,
            updated_at=updated,
            wake_at=_time(fields.get("w"), where),
            waiting_for=fields.get("wt") or None,
            lease_expires_at=_time(fields.get("l"), where) if status == "running" else None,
            deadline_at=_time(fields.get("dl"), where),
            parent_id=fields.get("pa"),
            parent_step=fields.get("ps"),
            priority=_int(fields, "pr", where) if "pr" in fields else 0,
            limits=limits_from_columns(
                fields.get("k1"),
                _int(fields, "m1", where) if "k1" in fields else None,
                fields.get("k2"),
                _int(fields, "m2", where) if "k2" in fields else None,
            ),
            blocked_by=fields.get("bb") or None,
            rates=rates_from_columns(
                fields.get("rk1"),
                _int(fields, "rm1", where) if "rk1" in fields else None,
                _int(fields, "rp1", where) if "rk1" in fields else None,
                fields.get("rk2"),
                _int(fields, "rm2", where) if "rk2" in fields else None,
                _int(fields, "rp2", where) if "rk2" in fields else None,
            ),
            debounce_key=fields.get("db") or None,
            headers=_headers(fields.get("hd"), where),
            version=_int(fields, "v", where) if "v" in fields else 1,
            fingerprint=fields.get("fp") or None,
        )
    except KeyError as exc:
        raise _BadData(f"{where} lacks a field Reflow writes") from exc


def _headers(text: str | None, where: str) -> dict[str, str]:
    try:
        headers = headers_from_column(text)
    except (ValueError, AttributeError) as exc:
        raise _BadData(f"{where} has malformed headers") from exc
    return headers


def _run_of(fields: Mapping[str, str]) -> RunRecord:
    """The record of a run hash, which names its own id."""
    run_id = fields.get("id")
    if not run_id:
        raise _BadData("a run hash lacks its id")
    return _run_record(run_id, fields)


def _step_record(name: str, value: str, run_id: str) -> tuple[int, StepRecord]:
    where = f"step {name!r} of run {run_id!r}"
    parts = value.split("|", 4)
    if len(parts) != 5 or not parts[0].isdigit():
        raise _BadData(f"{where} is not a step record")
    seq, done, status, wake, body = parts
    try:
        output, error, attempts = json.loads(body)
    except (ValueError, TypeError) as exc:
        raise _BadData(f"{where} has a malformed body") from exc
    if status not in ("completed", "failed", "skipped", "sleeping", "waiting"):
        raise _BadData(f"{where} has an unknown status {status!r}")
    if not isinstance(attempts, int) or not all(
        v is None or isinstance(v, str) for v in (output, error)
    ):
        raise _BadData(f"{where} has a malformed body")
    record = StepRecord(
        name=name,
        status=cast(StepStatus, status),
        output=output,
        error=error,
        attempts=attempts,
        wake_at=_time(wake, where),
        completed_at=_time(done, where),
    )
    return int(seq), record


def _steps(flat: Sequence[object], run_id: str) -> dict[str, StepRecord]:
    return _steps_of(_pairs(flat, f"steps of run {run_id!r}"), run_id)


def _steps_of(pairs: Mapping[str, str], run_id: str) -> dict[str, StepRecord]:
    """The records of a run's steps hash, in the order they were first saved."""
    if not pairs:
        return {}
    ordered = sorted(_step_record(name, value, run_id) for name, value in pairs.items())
    return {record.name: record for _, record in ordered}


def _claimed_run(entry: object) -> ClaimedRun:
    """One run of a ``claim.lua`` reply: one string, ``reclaim``, the number
    of the run hash's fields and values, those, then the steps hash's, joined
    by NUL characters; or, when one of them holds a NUL, ``{reclaim, run
    hash, steps hash}`` (each hash a flat list)."""
    if isinstance(entry, bytes):
        parts = _text(entry, "a claimed run").split("\0")
        size = parts[1] if len(parts) > 1 else ""
        if not size.isdigit() or int(size) % 2 or int(size) + 2 > len(parts):
            raise _BadData("a claimed run is not a run and its steps")
        end = 2 + int(size)
        if (len(parts) - end) % 2:
            raise _BadData("a claimed run's steps are not a hash")
        reclaim = parts[0]
        fields = dict(zip(parts[2:end:2], parts[3:end:2], strict=True))
        record = _run_of(fields)
        steps = _steps_of(dict(zip(parts[end::2], parts[end + 1 :: 2], strict=True)), record.id)
    else:
        if not isinstance(entry, list | tuple) or len(entry) != 3:
            raise _BadData("a claimed run is not a run and its steps")
        reclaim_flag, run_flat, steps_flat = entry
        reclaim = _text(reclaim_flag, "a claimed run")
        record = _run_of(_pairs(run_flat, "claimed run"))
        steps = _steps(steps_flat, record.id)
    if reclaim not in ("0", "1"):
        raise _BadData("a claimed run lacks its reclaim flag")
    return ClaimedRun(
        run=record,
        lease=Lease(record.id, record.lease_epoch),
        steps=steps,
        reclaimed=reclaim == "1",
    )


def _step_body(step: StepRecord) -> str:
    """A step's body as the scripts store it: the JSON text of ``[output,
    error, attempts]``, exactly as ``json.dumps`` with ``(",", ":")``
    separators writes it (ASCII, every control character escaped, so it
    never holds a NUL), built without an encoder object for the usual
    types."""
    output, error, attempts = step.output, step.error, step.attempts
    if (
        type(attempts) is int
        and (output is None or type(output) is str)
        and (error is None or type(error) is str)
    ):
        out = "null" if output is None else encode_basestring_ascii(output)
        err = "null" if error is None else encode_basestring_ascii(error)
        return f"[{out},{err},{attempts}]"
    return json.dumps([output, error, attempts], separators=(",", ":"))


def _step_args(step: StepRecord) -> list[str]:
    """A step as the scripts take it: name, status, wake time (µs or empty), body."""
    wake = "" if step.wake_at is None else str(to_epoch_us(step.wake_at, "step.wake_at"))
    return [step.name, step.status, wake, _step_body(step)]


def _str_arg(value: Any) -> Any:
    """``value`` as the text redis-py would send for it (an ``int`` as its
    digits); any other type is left to redis-py (see :func:`_joined`)."""
    return str(value) if type(value) is int else value


def _joined(items: Sequence[Sequence[Any]], width: int) -> list[Any]:
    """The fields of ``items`` (``width`` each) as the batch scripts take
    them (``batch_fields`` in ``lua/prelude.lua``): one argument, every field
    joined by NUL characters, so the client packs one argument per batch
    rather than ``width`` per item; or, when a field holds a NUL or is not a
    ``str``, the fields one argument each, as redis-py packs them."""
    try:
        text = "\0".join(map("\0".join, items))
    except TypeError:
        pass
    else:
        if text.count("\0") == len(items) * width - 1:
            return [text]
    return [field for item in items for field in item]


def _flags(reply: object, count: int, where: str) -> list[bool]:
    """The outcomes of a batch script that answers with one ``1`` (done) or
    ``0`` (refused) character per item."""
    text = _text(reply, where)
    if len(text) != count or text.strip("01"):
        raise _BadData(f"{where} answered {text[:40]!r} for {count} items")
    return [flag == "1" for flag in text]


def _delay_arg(new: NewRun) -> str:
    """A run's delay as the create scripts take it: microseconds, or empty for
    none (``None`` or zero: the run is created ``pending``)."""
    if not is_delayed(new) or new.delay is None:
        return ""
    return str(span_us(new.delay))


def _deadline_arg(new: NewRun) -> str:
    """A run's deadline as the create scripts take it: microseconds after
    creation, or empty for none."""
    if new.deadline is None:
        return ""
    return str(span_us(new.deadline))


def _option_args(new: NewRun) -> list[str]:
    """A run's priority, limits, rates and debounce key as the create
    scripts take them: the priority, then the limits' key1, max1, key2,
    max2, the rates' key1, max1, period1 (µs), key2, max2, period2 (empty
    where it has fewer), then the debounce key (empty for none)."""
    return [
        str(new.priority),
        *("" if v is None else str(v) for v in limit_columns(new.limits)),
        *("" if v is None else str(v) for v in rate_columns(new.rates)),
        new.debounce_key or "",
    ]


def _version_args(new: NewRun) -> list[str]:
    """A run's version (empty for 1) and fingerprint (empty for none) as the
    create scripts take them."""
    return ["" if new.version == 1 else str(new.version), new.fingerprint or ""]


def _limit_args(new: NewRun) -> list[str]:
    """:func:`_option_args`, then the headers' JSON text (empty for none),
    then :func:`_version_args`."""
    return [*_option_args(new), headers_column(new.headers) or "", *_version_args(new)]


def _create_many_args(ids: Sequence[str], news: Sequence[NewRun]) -> list[str]:
    """The runs ``news`` (with ids ``ids``) as ``create_many.lua`` takes them
    after the count and the token: a few columns of NUL-joined texts rather
    than arguments per run, and each distinct set of options (a *shape*:
    delay, deadline, priority, limits, rates, debounce key, version,
    fingerprint) once, so a batch of plain runs, or of runs of one version,
    costs a handful of arguments."""
    count = len(news)
    keys = [new.idempotency_key or "" for new in news]
    args = [
        "\0".join(ids),
        "\0".join([new.workflow for new in news]),
        "\0".join(keys) if any(keys) else "",
    ]
    if any(new.headers for new in news):
        texts = []
        last: object = None
        text = ""
        for new in news:
            if new.headers is not last:  # runs of one batch often share one mapping
                last = new.headers
                text = headers_column(new.headers) or ""
            texts.append(text)
        args.append("\0".join(texts))
    else:
        args.append("")
    odd = [
        i
        for i, new in enumerate(news)
        if new.delay is not None
        or new.deadline is not None
        or new.priority
        or new.limits
        or new.rates
        or new.debounce_key is not None
        or new.version != 1
        or new.fingerprint is not None
    ]
    if odd:
        shapes: dict[tuple[object, ...], str] = {}
        marks = [""] * count
        flat: list[str] = []
        for i in odd:
            new = news[i]
            key = (
                new.delay,
                new.deadline,
                new.priority,
                new.limits,
                new.rates,
                new.debounce_key,
                new.version,
                new.fingerprint,
            )
            mark = shapes.get(key)
            if mark is None:
                mark = shapes[key] = str(len(shapes))
                flat += [
                    _delay_arg(new),
                    _deadline_arg(new),
                    *_option_args(new),
                    *_version_args(new),
                ]
            marks[i] = mark
        args += ["\0".join(marks), str(len(shapes)), *flat]
    else:
        args += ["", "0"]
    inputs = [new.input for new in news]
    joined = "\0".join(inputs)
    if joined.count("\0") == count - 1:
        args.append(joined)
    else:  # an input holds a NUL: one argument each
        args += inputs
    return args


def _schedule_record(key: str, fields: Mapping[str, str]) -> ScheduleRecord:
    where = f"schedule {key!r}"
    try:
        next_run = _time(fields["next"], where)
        created = _time(fields["c"], where)
        updated = _time(fields["u"], where)
        if next_run is None or created is None or updated is None:
            raise _BadData(f"{where} lacks a time")
        return ScheduleRecord(
            key=key,
            workflow=fields["wf"],
            input=fields["in"],
            recurrence=fields["rec"],
            next_run_at=next_run,
            created_at=created,
            updated_at=updated,
            paused=fields.get("p") == "1",
        )
    except KeyError as exc:
        raise _BadData(f"{where} lacks a field Reflow writes") from exc


def _worker_record(worker_id: str, fields: Mapping[str, str]) -> WorkerRecord:
    where = f"worker {worker_id!r}"
    try:
        started = _time(fields["s"], where)
        seen = _time(fields["seen"], where)
        expires = _time(fields["exp"], where)
        if started is None or seen is None or expires is None:
            raise _BadData(f"{where} lacks a time")
        try:
            workflows = decode_workflows(fields["wfs"])
        except (ValueError, StorageError) as exc:
            raise _BadData(f"{where} has malformed workflows") from exc
        return WorkerRecord(
            id=worker_id,
            host=fields["host"],
            pid=_int(fields, "pid", where),
            workflows=workflows,
            concurrency=_int(fields, "conc", where),
            in_flight=_int(fields, "inf", where),
            started_at=started,
            last_seen_at=seen,
            expires_at=expires,
        )
    except KeyError as exc:
        raise _BadData(f"{where} lacks a field Reflow writes") from exc
