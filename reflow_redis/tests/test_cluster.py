"""On a real Redis Cluster: three primaries started for this module.

Every key of one prefix carries the hash tag ``{prefix}``, so every script's
keys live in one slot; with ``cluster=true`` the storage uses redis-py's
cluster client, which routes each script call to the node owning that slot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from reflow_core import Engine, workflow
from reflow_core.storage import NewRun, ScheduleSpec, WorkerInfo
from reflow_redis import RedisStorage


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    sockets = []
    while len(ports) < count:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port + 10000 < 65536:  # the cluster bus uses port + 10000
            ports.append(port)
        sockets.append(s)
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL of one node of a fresh three-primary cluster on 127.0.0.1."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server and redis-cli are required under CI")
        pytest.skip("redis-server or redis-cli is not installed")
    base = tmp_path_factory.mktemp("cluster")
    ports = _free_ports(3)
    procs = []
    try:
        for port in ports:
            folder: Path = base / str(port)
            folder.mkdir()
            procs.append(
                subprocess.Popen(
                    [
                        server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(folder),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            client.close()
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        client = redis.Redis(port=ports[0])
        for _ in range(200):
            if b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"):
                break
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{ports[0]}/0?cluster=true"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_a_workflow_runs_end_to_end_on_a_cluster(cluster: str) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    url = f"{cluster}&prefix={prefix}"
    got: list[Any] = []
    wf = (
        workflow("clustered")
        .step("a", lambda ctx: 1)
        .parallel({"b": lambda ctx: 2, "c": lambda ctx: 3})
        .sleep("nap", "100ms")
        .wait_for_event("go", timeout="1m")
        .step("d", lambda ctx: got.append(ctx.prev) or "done")
    )
    async with (
        Engine(storage=url, workflows=[wf], poll_interval="30s") as worker,
        Engine(storage=url, workflows=[wf], worker=False) as sender,
    ):
        run = await sender.enqueue(wf, None, idempotency_key="k1")
        again = await sender.enqueue(wf, None, idempotency_key="k1")
        assert again.id == run.id
        for _ in range(500):
            if (await sender.get_run_status(run.id)).status == "waiting":
                break
            await asyncio.sleep(0.01)
        await sender.send_event(run.id, "go", {"ok": True})
        assert await worker.result(run.id, timeout=10) == "done"
    assert got == [{"ok": True}]

    # Every key of the prefix hashes to one slot, on one node.
    client = redis.RedisCluster.from_url(cluster.split("?")[0])
    keys = list(client.scan_iter(match="{" + prefix + "}*", target_nodes="all"))
    assert keys
    slots = {client.keyslot(k) for k in keys}
    assert len(slots) == 1
    client.close()


async def test_two_prefixes_may_live_on_different_shards(cluster: str) -> None:
    stores = [RedisStorage.from_url(f"{cluster}&prefix=app{i}") for i in range(12)]
    for store in stores:
        await store.initialize()
        await store.create_run(NewRun("wf", "1"))
    client = redis.RedisCluster.from_url(cluster.split("?")[0])
    owners = {client.get_node_from_key(f"{{app{i}}}:idx").name for i in range(12)}
    client.close()
    for store in stores:
        claimed = await store.claim_runs(["wf"], 5, timedelta(seconds=5))
        assert len(claimed) == 1
        await store.close()
    assert len(owners) > 1  # twelve prefixes spread over the three primaries


async def test_workers_stats_and_paused_schedules_live_in_the_prefix_slot(cluster: str) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    store = RedisStorage.from_url(f"{cluster}&prefix={prefix}")
    await store.initialize()
    try:
        await store.announce_worker(WorkerInfo("w", "h", 1, ("wf",), 2, 0), timedelta(minutes=1))
        assert [w.id for w in await store.list_workers()] == ["w"]
        await store.create_run(NewRun("wf", "1"))
        [claimed] = await store.claim_runs(["wf"], 1, timedelta(seconds=5))
        assert await store.sleep_run(claimed.lease, "nap", timedelta(hours=1)) is not None
        [stats] = await store.queue_stats()
        assert (stats.workflow, stats.sleeping) == ("wf", 1)
        now = await store.now()
        await store.upsert_schedule(ScheduleSpec("s", "wf", "1", "every:60", now))
        paused = await store.set_schedule_paused("s", True)
        assert paused is not None
        assert paused.paused
        assert await store.due_schedules(5) == []
    finally:
        await store.close()
    client = redis.RedisCluster.from_url(cluster.split("?")[0])
    keys = list(client.scan_iter(match="{" + prefix + "}*", target_nodes="all"))
    assert {client.keyslot(k) for k in keys} == {client.keyslot(prefix)}
    client.close()


async def test_get_runs_reads_the_prefix_slot(cluster: str) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    store = RedisStorage.from_url(f"{cluster}&prefix={prefix}")
    await store.initialize()
    try:
        ids = [(await store.create_run(NewRun("wf", str(n)))).run.id for n in range(20)]
        [claimed] = await store.claim_runs(["wf"], 1, timedelta(seconds=5))
        asked = [*ids, "missing", ids[0]]
        expected = {run_id: await store.get_run(run_id) for run_id in ids}
        assert await store.get_runs(asked) == expected
        assert (await store.get_runs([claimed.run.id]))[claimed.run.id].status == "running"
    finally:
        await store.close()
