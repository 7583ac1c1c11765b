"""Claims and due schedules under a backlog: with 100,000 pending runs of the
claimed workflow behind its head and 100,000 older ones of a workflow nobody
claims (plus timed runs of both), the claim reads the head of each served
workflow's range of the queue indexes and stops at its limit, with the plan
the statement gets as it is sent and the generic one a prepared statement
may keep, also once many runs at the head were claimed and left dead index
entries behind. The same for the due schedules of an engine's workflows.
Plans, not timings, are asserted (``EXPLAIN (ANALYZE, BUFFERS)``)."""

from __future__ import annotations

from datetime import timedelta

import psycopg
from psycopg import sql

from reflow_core.storage import NewRun, ScheduleSpec
from reflow_postgres import PostgresStorage
from reflow_postgres._sql import list_runs_query

from . import _plans

Node = dict[str, object]

Admin = psycopg.Connection[tuple[object, ...]]
LEASE = timedelta(seconds=30)
BACKLOG = 100_000


def insert_runs(
    admin: Admin, schema: str, prefix: str, workflow: str, count: int, status: str, wake_at: str
) -> None:
    """``count`` runs in one statement, due at ``wake_at`` (an SQL expression
    of ``i``, the row's number), created in that order."""
    admin.execute(
        sql.SQL(
            "INSERT INTO {}.runs (id, workflow, status, input, attempts, created_at, updated_at,"
            " wake_at) SELECT %s || lpad(i::text, 7, '0'), %s, %s, '1',"
            " CASE WHEN %s = 'pending' THEN 0 ELSE 1 END, {wake}, {wake}, {wake}"
            " FROM generate_series(1, %s) AS i"
        ).format(sql.Identifier(schema), wake=sql.SQL(wake_at)),
        (prefix, workflow, status, status, count),
    )


def claim_nodes(admin: Admin, store: PostgresStorage, *, generic: bool) -> list[Node]:
    """The plan of a claim of up to 10 runs of ``wf``, rolled back."""
    params = {"workflows": ["wf"], "limit": 10, "lease": LEASE, "probe": True, "skip": []}
    statement = store._sql["claim"].decode()
    with admin.transaction(force_rollback=True):
        if generic:
            return _plans.explain_generic(admin, statement, params)
        return _plans.explain(admin, statement, params)


def assert_reads_the_heads(nodes: list[Node]) -> None:
    """No scan of a whole table, every scan of runs through the per-workflow
    queue indexes (or the running runs, or the primary key), the pending
    head read up to the limit, no sort of more than a few rows, few blocks."""
    top = nodes[0]
    scans = [n for n in nodes if "Index Name" in n]
    used = {str(n["Index Name"]) for n in scans}
    assert used <= {
        "runs_ready",
        "runs_due",
        "runs_running",
        "runs_pkey",
        "steps_pkey",
        "rate_waits_due",
    }, used
    ready = [n for n in scans if n["Index Name"] == "runs_ready"]
    timed = [n for n in scans if n["Index Name"] == "runs_due"]
    assert ready
    assert timed
    for node in ready + timed:
        assert "workflow =" in str(node["Index Cond"]), node["Index Cond"]
        assert "wake_at <=" in str(node["Index Cond"]), node["Index Cond"]
    assert all(int(str(n["Actual Rows"])) <= 10 for n in ready), ready
    assert all(int(str(n["Actual Rows"])) == 0 for n in timed), timed
    seq = [n for n in nodes if n.get("Node Type") == "Seq Scan"]
    assert all(n.get("Relation Name") == "rate_waits" for n in seq), seq
    sorts = [n for n in nodes if n.get("Node Type") in ("Sort", "Incremental Sort")]
    assert all(int(str(n["Actual Rows"])) <= 20 for n in sorts), sorts
    # What it read, the claimed rows' writes (an entry in each index of
    # runs for each of them) left out.
    writes = sum(_plans.blocks(n) for n in nodes if n.get("Node Type") == "ModifyTable")
    # A few hundred at most: the dead entries a drain leaves at the head of
    # runs_ready are stepped over (index and heap pages) until a scan may
    # mark them dead, which a transaction elsewhere in the database can put
    # off. Reading the backlog would take thousands.
    assert _plans.blocks(top) - writes < 300, _plans.blocks(top) - writes


async def test_the_claim_reads_only_the_heads_of_its_workflows_under_a_backlog(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """100,000 pending runs of ``wf`` behind its 2,000 first ones, 100,000
    older pending runs and 20,000 due sleeping runs of a workflow nobody
    claims here, and 20,000 runs of ``wf`` waiting for later: the claim
    reads the head of ``wf``'s pending runs and the (empty) range of its due
    timed runs, in the custom and the generic plan alike, and takes the
    runs in order. After 1,500 claimed runs left dead entries at the head
    of runs_ready, it still does."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    try:
        hour = "now() - interval '1 hour' + i * interval '1 millisecond'"
        insert_runs(admin, schema, "old", "unserved", BACKLOG, "pending", hour)
        insert_runs(admin, schema, "nap", "unserved", 20_000, "sleeping", hour)
        front = "now() - interval '20 minutes' + i * interval '1 millisecond'"
        insert_runs(admin, schema, "front", "wf", 2_000, "pending", front)
        behind = "now() - interval '10 minutes' + i * interval '1 millisecond'"
        insert_runs(admin, schema, "back", "wf", BACKLOG, "pending", behind)
        later = "now() + interval '1 hour' + i * interval '1 millisecond'"
        insert_runs(admin, schema, "later", "wf", 20_000, "waiting", later)
        admin.execute(sql.SQL("ANALYZE {}.runs").format(ident))
        for generic in (False, True):
            assert_reads_the_heads(claim_nodes(admin, store, generic=generic))

        taken: list[str] = []
        while len(taken) < 1_500:
            claimed = await store.claim_runs(["wf", "wf"], 25, LEASE)
            taken.extend(c.run.id for c in claimed)
        assert taken == [f"front{i:07d}" for i in range(1, 1_501)]
        # Finished, as a drain leaves them: dead entries at the head of
        # runs_ready (and of runs_running) until a vacuum.
        admin.execute(
            sql.SQL(
                "UPDATE {}.runs SET status = 'completed', finished_at = now(),"
                " lease_expires_at = NULL WHERE id = ANY(%s)"
            ).format(ident),
            (taken,),
        )
        for generic in (False, True):
            assert_reads_the_heads(claim_nodes(admin, store, generic=generic))
        [first] = await store.claim_runs(["wf"], 1, LEASE)
        assert first.run.id == "front0001501"
    finally:
        await store.close()


async def test_next_due_reads_the_first_timed_run_of_each_workflow(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """When a worker's next timed run falls due: one entry of runs_due for
    each of its workflows, however many runs of other workflows wake before
    it and however many of its own wake after it."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        soon = "now() + interval '1 minute' + i * interval '1 millisecond'"
        insert_runs(admin, schema, "other", "unserved", BACKLOG, "sleeping", soon)
        later = "now() + interval '1 hour' + i * interval '1 millisecond'"
        insert_runs(admin, schema, "mine", "wf", 50_000, "waiting", later)
        admin.execute(sql.SQL("ANALYZE {}.runs").format(sql.Identifier(schema)))
        params = {"workflows": ["wf", "none"]}
        statement = store._sql["next_due"].decode()
        for generic in (False, True):
            with admin.transaction(force_rollback=True):
                if generic:
                    nodes = _plans.explain_generic(admin, statement, params)
                else:
                    nodes = _plans.explain(admin, statement, params)
            runs = [n for n in nodes if n.get("Relation Name") == "runs"]
            assert runs
            assert all(n.get("Index Name") == "runs_due" for n in runs), runs
            assert all(int(str(n["Actual Rows"])) <= 1 for n in runs), runs
            assert _plans.blocks(nodes[0]) < 50
        due = await store._next_due(["wf"])
        assert due is not None
        assert 3590 < due <= 3600
    finally:
        await store.close()


async def test_due_schedules_of_some_workflows_read_their_own_heads(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """50,000 due schedules of a workflow nobody serves here, due before the
    ten of ``wf`` and ``wf2``: due_schedules with those workflows reads
    their ranges of schedules_workflow_due only and returns theirs, earliest
    first, then by key, up to the limit; paused ones are left out, an empty
    collection gives nothing, and None gives every workflow's."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    try:
        admin.execute(
            sql.SQL(
                "INSERT INTO {}.schedules (key, workflow, input, recurrence, next_run_at,"
                " created_at, updated_at) SELECT 'other' || lpad(i::text, 6, '0'), 'unserved',"
                " '1', 'every:60', now() - interval '1 day' + i * interval '1 millisecond',"
                " now(), now() FROM generate_series(1, 50000) AS i"
            ).format(ident)
        )
        for i in range(10):
            spec = ScheduleSpec(
                f"k{i}",
                "wf" if i % 2 else "wf2",
                "1",
                "every:60",
                # Two by two at the same time: the key breaks the tie.
                await store.now() - timedelta(minutes=10 - i // 2),
            )
            await store.upsert_schedule(spec)
        await store.set_schedule_paused("k3", True)
        admin.execute(sql.SQL("ANALYZE {}.schedules").format(ident))
        params = {"workflows": ["wf", "wf2"], "limit": 5}
        statement = store._sql["due_schedules_of"].decode()
        for generic in (False, True):
            with admin.transaction(force_rollback=True):
                if generic:
                    nodes = _plans.explain_generic(admin, statement, params)
                else:
                    nodes = _plans.explain(admin, statement, params)
            scans = [n for n in nodes if n.get("Relation Name") == "schedules"]
            assert scans, nodes
            assert all(n.get("Index Name") == "schedules_workflow_due" for n in scans), scans
            assert all(int(str(n["Actual Rows"])) <= 5 for n in scans), scans
            assert _plans.blocks(nodes[0]) < 30

        due = await store.due_schedules(5, ["wf2", "wf", "wf"])
        assert [s.key for s in due] == ["k0", "k1", "k2", "k4", "k5"]
        assert [s.key for s in await store.due_schedules(3, {"wf"})] == ["k1", "k5", "k7"]
        assert await store.due_schedules(5, []) == []
        assert await store.due_schedules(5, ["nobody"]) == []
        assert [s.key for s in await store.due_schedules(2)] == ["other000001", "other000002"]
        assert [s.key for s in await store.due_schedules(2, None)] == [
            "other000001",
            "other000002",
        ]
    finally:
        await store.close()


async def test_a_repeated_workflow_is_claimed_from_once(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """A workflow named twice is served once: each run comes back once, and
    the claim's limit holds."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    try:
        made = await store.create_runs([NewRun("wf", str(i)) for i in range(5)])
        claimed = await store.claim_runs(["wf", "wf", "wf"], 3, LEASE)
        assert [c.run.id for c in claimed] == [m.run.id for m in made[:3]]
        rest = await store.claim_runs(["wf", "other", "wf"], 10, LEASE)
        assert [c.run.id for c in rest] == [m.run.id for m in made[3:]]
    finally:
        await store.close()


async def test_the_newest_pending_runs_are_read_from_the_newest(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """The engine's look for runs nobody serves lists the newest pending
    runs: with 100,000 pending runs and 20,000 finished ones, and the
    table's statistics, that is a walk of runs_created from the newest entry,
    stopped at the limit, not a read and a sort of the whole table. Delayed
    runs (stored as sleeping) are still told from sleeping ones."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    try:
        minute = "now() - interval '1 hour' + i * interval '1 millisecond'"
        insert_runs(admin, schema, "done", "wf", 20_000, "completed", minute)
        insert_runs(admin, schema, "queued", "wf", BACKLOG, "pending", minute)
        later = await store.create_run(NewRun("wf", "1", delay=timedelta(hours=1)))
        admin.execute(sql.SQL("ANALYZE {}.runs").format(ident))
        page = await store.list_runs(status=["pending"], limit=100)
        assert [r.id for r in page.runs] == [f"queued{i:07d}" for i in range(BACKLOG, 99_900, -1)]
        delayed = await store.list_runs(status=["delayed"], limit=10)
        assert [r.id for r in delayed.runs] == [later.run.id]
        assert (await store.list_runs(status=["sleeping"], limit=10)).runs == []

        params: dict[str, object] = {"statuses": ["pending"], "stored": ["pending"], "limit": 101}
        statement = list_runs_query(store._sql, params).decode()
        for generic in (False, True):
            with admin.transaction(force_rollback=True):
                if generic:
                    nodes = _plans.explain_generic(admin, statement, params)
                else:
                    nodes = _plans.explain(admin, statement, params)
            assert not [n for n in nodes if n.get("Node Type") in ("Seq Scan", "Sort")], nodes
            scans = [n for n in nodes if n.get("Index Name")]
            assert [n["Index Name"] for n in scans] == ["runs_created"], scans
            assert _plans.blocks(nodes[0]) < 50
    finally:
        await store.close()


async def test_a_claim_of_some_versions_passes_the_others_over_and_leaves_them(
    postgres_url: str, schema: str, admin: Admin
) -> None:
    """500 pending runs of version 1 of ``wf`` (and 50,000 of a workflow
    nobody claims here) ahead of its runs of version
    2 (one of them holding a rate, so claim_held takes it), a lapsed lease
    and a due sleeping run of version 1 before everything, and a lapsed
    lease of version 2: a claim serving version 2 walks the same ranges of
    runs_ready, runs_due and runs_running as the claim of every version (in
    the custom and the generic plan), passing the other runs over, and
    takes the lapsed lease of version 2, then its runs of version 2; every
    other row of runs is left as it was, none locked, blocked or changed.
    The claim of every version has no version filter in its statements."""
    store = PostgresStorage.from_url(postgres_url)
    await store.initialize()
    ident = sql.Identifier(schema)
    try:
        for name, served in (("claim", "claim_served"), ("claim_limited", "claim_limited_served")):
            assert b"%(versions)s" not in store._sql[name], name
            assert b"%(versions)s" in store._sql[served], served
        hour = "now() - interval '1 hour' + i * interval '1 millisecond'"
        insert_runs(admin, schema, "old", "unserved", 50_000, "pending", hour)
        front = "now() - interval '20 minutes' + i * interval '1 millisecond'"
        insert_runs(admin, schema, "v1-", "wf", 500, "pending", front)
        admin.execute(
            sql.SQL(
                "INSERT INTO {}.runs (id, workflow, status, input, attempts, lease_epoch,"
                " created_at, updated_at, wake_at, lease_expires_at, version, rate_key1,"
                " rate_max1, rate_period1) VALUES"
                " ('v1-lapsed', 'wf', 'running', '1', 1, 1, now(), now(), NULL,"
                "  now() - interval '1 hour', 1, NULL, NULL, NULL),"
                " ('v1-asleep', 'wf', 'sleeping', '1', 1, 1, now(), now(),"
                "  now() - interval '2 hours', NULL, 1, NULL, NULL, NULL),"
                " ('v1-rated', 'wf', 'pending', '1', 0, 0, now(), now(),"
                "  now() - interval '1 hour', NULL, 1, 'r', 5, 3600000000),"
                " ('v2-lapsed', 'wf', 'running', '1', 1, 1, now(), now(), NULL,"
                "  now() - interval '1 second', 2, NULL, NULL, NULL),"
                " ('v2', 'wf', 'pending', '1', 0, 0, now(), now(),"
                "  now() - interval '1 minute', NULL, 2, NULL, NULL, NULL),"
                " ('v2-rated', 'wf', 'pending', '1', 0, 0, now(), now(),"
                "  now() - interval '30 seconds', NULL, 2, 'r', 5, 3600000000)"
            ).format(ident)
        )
        admin.execute(sql.SQL("ANALYZE {}.runs").format(ident))
        every = sql.SQL("SELECT * FROM {}.runs ORDER BY id").format(ident)
        before = admin.execute(every).fetchall()

        params = {
            "workflows": ["wf"],
            "limit": 10,
            "lease": LEASE,
            "probe": True,
            "skip": [],
            "versions": '{"wf": [2]}',
        }
        statement = store._sql["claim_served"].decode()
        for generic in (False, True):
            with admin.transaction(force_rollback=True):
                if generic:
                    nodes = _plans.explain_generic(admin, statement, params)
                else:
                    nodes = _plans.explain(admin, statement, params)
            scans = [n for n in nodes if "Index Name" in n]
            used = {str(n["Index Name"]) for n in scans}
            assert used <= {
                "runs_ready",
                "runs_due",
                "runs_running",
                "runs_pkey",
                "steps_pkey",
                "rate_waits_due",
            }, used
            queues = [n for n in scans if n["Index Name"] in ("runs_ready", "runs_due")]
            assert {str(n["Index Name"]) for n in queues} == {"runs_ready", "runs_due"}
            for node in queues:
                assert "workflow =" in str(node["Index Cond"]), node["Index Cond"]
                assert "wake_at <=" in str(node["Index Cond"]), node["Index Cond"]
                assert int(str(node["Actual Rows"])) <= 2, node
            seq = [n for n in nodes if n.get("Node Type") == "Seq Scan"]
            assert all(n.get("Relation Name") == "rate_waits" for n in seq), seq
            sorts = [n for n in nodes if n.get("Node Type") in ("Sort", "Incremental Sort")]
            assert all(int(str(n["Actual Rows"])) <= 20 for n in sorts), sorts

        claimed = await store.claim_runs(["wf"], 1, LEASE, versions={"wf": [2]})
        assert [(c.run.id, c.reclaimed) for c in claimed] == [("v2-lapsed", True)]
        claimed = await store.claim_runs(["wf"], 10, LEASE, versions={"wf": [2, 3]})
        assert [(c.run.id, c.run.version) for c in claimed] == [("v2", 2), ("v2-rated", 2)]
        assert await store.claim_runs(["wf"], 10, LEASE, versions={"wf": [2]}) == []
        taken = {"v2-lapsed", "v2", "v2-rated"}
        after = admin.execute(every).fetchall()
        assert [row for row in after if row[0] not in taken] == [
            row for row in before if row[0] not in taken
        ]
        # The claim of every version takes the others, the lapsed lease first
        # (a run holding a rate comes back last: claim_held takes it after).
        rest = await store.claim_runs(["wf"], 4, LEASE)
        assert [c.run.id for c in rest] == ["v1-lapsed", "v1-asleep", "v1-0000001", "v1-rated"]
    finally:
        await store.close()
