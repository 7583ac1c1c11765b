"""The web examples (``examples/web``), served by real servers and driven
over real HTTP, on SQLite and PostgreSQL: a request enqueues an order, a
``reflow worker`` process (a separate one) runs it, and a second request
reads its result.

- FastAPI under uvicorn, with ``reflow_lifespan`` and ``EngineDep``;
- Flask under gunicorn, pre-forked (``--preload``, two processes of four
  threads), with the ``Reflow`` extension's ``SyncClient``;
- Django under gunicorn, with ``enqueue_on_commit`` (a rolled-back order
  enqueues nothing) and ``manage.py reflow_worker``; on PostgreSQL, Django's
  own tables are in the same database as Reflow's schema.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from reflow_conformance.testsupport import child_env, free_port
from reflow_core import SyncClient

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "web"
DJANGO = EXAMPLES / "django_shop"


@pytest.fixture(params=["sqlite", "postgres"])
def web_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The Reflow store the example's processes share."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/reflow.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def check_alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"{self.name} exited with {code}:\n{self.output()}"


class Processes:
    """The processes of one example, stopped at the end of the test."""

    def __init__(self, root: Path, store: str, **env: str) -> None:
        self.root = root
        self.env = {**child_env(), "REFLOW_URL": store, **env}
        self.started: list[Process] = []

    def start(self, name: str, argv: list[str], cwd: Path) -> Process:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=cwd
            )
        process = Process(name, proc, log)
        self.started.append(process)
        return process

    def run(self, argv: list[str], cwd: Path) -> None:
        subprocess.run(argv, env=self.env, cwd=cwd, check=True, capture_output=True, timeout=60)

    def serve(self, name: str, argv: list[str], cwd: Path, port: int) -> str:
        """Start a server listening on ``port`` and wait until it answers."""
        server = self.start(name, argv, cwd)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            server.check_alive()
            try:
                httpx.get(f"{base}/orders/0", timeout=2)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} did not answer:\n{server.output()}") from None
                time.sleep(0.1)
            else:
                return base

    def stop(self) -> None:
        for process in self.started:
            if process.proc.poll() is None:
                process.proc.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.proc.wait(20)
            except subprocess.TimeoutExpired:
                process.proc.kill()
                process.proc.wait()


@pytest.fixture
def processes(web_store: str, tmp_path: Path) -> Iterator[Processes]:
    group = Processes(tmp_path, web_store, DJANGO_DB=str(tmp_path / "django.sqlite3"))
    try:
        yield group
    finally:
        group.stop()


def _worker(processes: Processes) -> Process:
    argv = [sys.executable, "-m", "reflow_core", "worker", "shop:make_engine"]
    return processes.start("worker", [*argv, "--app-dir", str(EXAMPLES)], EXAMPLES)


def _gunicorn(app: str, port: int) -> list[str]:
    # Pre-forked: the app is imported (and its client made) in the master,
    # then used by two forked processes of four threads each.
    return [
        *(sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}"),
        *("--workers", "2", "--threads", "4", "--preload", "--graceful-timeout", "5"),
    ]


def _order(base: str, item: str, quantity: int) -> dict[str, Any]:
    response = httpx.post(f"{base}/orders", json={"item": item, "quantity": quantity}, timeout=30)
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def _result(base: str, key: object) -> httpx.Response:
    return httpx.get(f"{base}/orders/{key}/result", params={"timeout": 30}, timeout=60)


def _check_confirmed(output: dict[str, Any], quantity: int, worker: Process) -> None:
    assert output["total_cents"] == 450 * quantity
    # Run by the worker process, not by the web server.
    assert str(worker.proc.pid) in str(output["confirmed_by"])


def test_fastapi(processes: Processes) -> None:
    worker = _worker(processes)
    port = free_port()
    base = processes.serve(
        "uvicorn",
        [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--port", str(port)],
        EXAMPLES,
        port,
    )
    run_id = _order(base, "tea", 2)["run_id"]
    result = _result(base, run_id)
    assert result.status_code == 200, result.text
    _check_confirmed(result.json(), 2, worker)
    status = httpx.get(f"{base}/orders/{run_id}", timeout=10).json()
    assert status["status"] == "completed"

    refused = httpx.post(f"{base}/orders", json={"item": "tea", "quantity": 0}, timeout=10)
    assert refused.status_code == 422
    unknown = _order(base, "scones", 1)["run_id"]
    failed = _result(base, unknown)
    assert failed.status_code == 409
    assert "we do not sell 'scones'" in failed.json()["detail"]
    assert httpx.get(f"{base}/orders/nope", timeout=10).status_code == 404
    worker.check_alive()


def test_flask_under_a_pre_forking_server(processes: Processes) -> None:
    worker = _worker(processes)
    port = free_port()
    base = processes.serve("gunicorn", _gunicorn("flask_app:app", port), EXAMPLES, port)

    def order_and_wait(quantity: int) -> dict[str, Any]:
        run_id = _order(base, "tea", quantity)["run_id"]
        result = _result(base, run_id)
        assert result.status_code == 200, result.text
        output: dict[str, Any] = result.json()
        return output

    # 20 requests at once, over both processes and their threads.
    with ThreadPoolExecutor(20) as pool:
        outputs = list(pool.map(order_and_wait, range(1, 21)))
    for quantity, output in enumerate(outputs, start=1):
        _check_confirmed(output, quantity, worker)

    failed = _result(base, _order(base, "scones", 1)["run_id"])
    assert failed.status_code == 409
    assert "we do not sell" in failed.text
    assert httpx.get(f"{base}/orders/nope", timeout=10).status_code == 404
    worker.check_alive()


def test_django_enqueues_on_commit(processes: Processes, web_store: str) -> None:
    if web_store.startswith("postgresql://"):
        # Django's tables in the same database as Reflow's schema, as many
        # projects will have them.
        processes.env["DJANGO_DB"] = web_store.split("?", 1)[0]
    processes.run([sys.executable, "manage.py", "migrate", "--noinput"], DJANGO)
    worker = processes.start("worker", [sys.executable, "manage.py", "reflow_worker"], DJANGO)
    port = free_port()
    base = processes.serve("gunicorn", _gunicorn("shop_site.wsgi", port), DJANGO, port)

    placed = _order(base, "tea", 3)
    result = _result(base, placed["order_id"])
    assert result.status_code == 200, result.text
    output = result.json()
    assert output["order_id"] == placed["order_id"]
    assert output["total_cents"] == 1350
    assert output["confirmed_by"] == worker.proc.pid
    # The workflow's last step saved the order through Django's ORM.
    status = httpx.get(f"{base}/orders/{placed['order_id']}", timeout=10).json()
    assert status == {
        "order_id": placed["order_id"],
        "status": "confirmed",
        "total_cents": 1350,
        "run_status": "completed",
    }

    # Out of stock: the view saved the order and asked for a run on commit,
    # then rolled back. Nothing was enqueued, and the order is gone.
    refused = httpx.post(f"{base}/orders", json={"item": "cake", "quantity": 50}, timeout=30)
    assert refused.status_code == 409
    assert "only 12 cake left" in refused.text
    with SyncClient(web_store) as client:
        runs = client.list_runs().runs
    assert [run.id for run in runs] == [placed["run_id"]]
    next_id = placed["order_id"] + 1
    assert httpx.get(f"{base}/orders/{next_id}", timeout=10).status_code == 404
    worker.check_alive()


def test_the_django_worker_command_checks_its_options(tmp_path: Path) -> None:
    env = {**child_env(), "REFLOW_URL": f"sqlite:///{tmp_path}/r.db"}
    env["DJANGO_DB"] = str(tmp_path / "django.sqlite3")
    done = subprocess.run(
        [sys.executable, "manage.py", "reflow_worker", "--workflows", "place_order,nope"],
        env=env,
        cwd=DJANGO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown workflow 'nope'; reflow_core.contrib.django:engine has: place_order" in (
        done.stderr
    )
    assert "Usage: manage.py reflow_worker" in done.stderr
