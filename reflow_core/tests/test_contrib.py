"""The framework helpers in-process: Starlette's and FastAPI's lifespan and
dependency, the Flask extension, and the Django app (its settings, the
workflows it loads, ``enqueue_on_commit`` against real transactions).

The examples built on them are served over real HTTP in
``test_web_frameworks.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.test.utils import override_settings
from fastapi import FastAPI
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from reflow_core import (
    ConfigError,
    Engine,
    EngineClosedError,
    Run,
    StepContext,
    SyncClient,
    ValidationError,
    WorkflowNotFoundError,
    workflow,
)
from reflow_core.contrib import django as reflow_django
from reflow_core.contrib.fastapi import EngineDep
from reflow_core.contrib.flask import Reflow
from reflow_core.contrib.starlette import get_engine, reflow_lifespan


def _double(ctx: StepContext[dict[str, int], None]) -> int:
    return ctx.input["n"] * 2


def _check(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not isinstance(value.get("n"), int):
        raise TypeError("the input must be {'n': int}")
    return value


DOUBLE = workflow("double", input=_check).step("double", _double)


# -- Starlette and FastAPI ---------------------------------------------------------


async def _enqueue_and_wait(request: Request) -> JSONResponse:
    engine = get_engine(request)
    run = await engine.enqueue(DOUBLE, {"n": int(request.query_params["n"])})
    return JSONResponse({"output": await engine.result(run.id, timeout="10s")})


def test_a_lifespan_with_a_worker_runs_the_runs_in_the_app() -> None:
    app = Starlette(
        routes=[Route("/double", _enqueue_and_wait)],
        lifespan=reflow_lifespan(
            "memory://", workflows=[DOUBLE], worker=True, poll_interval="50ms"
        ),
    )
    with TestClient(app) as client:
        assert client.get("/double", params={"n": 21}).json() == {"output": 42}
        engine = app.state.reflow_engine
        assert engine.running
    # Shut down: the engine was closed, and the app no longer holds it.
    assert not hasattr(app.state, "reflow_engine")
    with pytest.raises(EngineClosedError):
        asyncio.run(engine.get_run("x"))
    # Started again, the app gets a new engine.
    with TestClient(app) as client:
        assert client.get("/double", params={"n": 2}).json() == {"output": 4}
        assert app.state.reflow_engine is not engine


def test_the_apps_own_lifespan_runs_inside_reflows() -> None:
    seen: list[str] = []

    @contextlib.asynccontextmanager
    async def own(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # The engine is usable at the app's startup.
        engine: Engine = app.state.reflow_engine
        seen.append((await engine.list_runs()).runs.__class__.__name__)
        yield {"greeting": "hello"}
        seen.append("own shutdown")

    async def both(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "greeting": request.state.greeting,
                "engine": type(get_engine(request)).__name__,
            }
        )

    app = Starlette(routes=[Route("/", both)], lifespan=reflow_lifespan("memory://", lifespan=own))
    with TestClient(app) as client:
        assert client.get("/").json() == {"greeting": "hello", "engine": "Engine"}
    assert seen == ["list", "own shutdown"]


def test_an_app_without_reflows_lifespan_says_so() -> None:
    async def route(request: Request) -> JSONResponse:
        get_engine(request)
        return JSONResponse({})

    app = Starlette(routes=[Route("/", route)])
    with TestClient(app) as client, pytest.raises(RuntimeError, match="lifespan=reflow_lifespan"):
        client.get("/")


def test_storage_and_workflows_are_given_once() -> None:
    with pytest.raises(ConfigError, match="pass storage and workflows once"):
        reflow_lifespan("memory://", storage="memory://")


def test_fastapi_hands_the_engine_to_a_route() -> None:
    app = FastAPI(lifespan=reflow_lifespan("memory://", workflows=[DOUBLE], worker=True))

    @app.post("/double/{n}")
    async def double(n: int, engine: EngineDep) -> dict[str, Any]:
        run = await engine.enqueue(DOUBLE, {"n": n})
        return {"output": await engine.result(run.id, timeout="10s")}

    with TestClient(app) as client:
        assert client.post("/double/5").json() == {"output": 10}


# -- Flask ---------------------------------------------------------------------------


def test_the_flask_extension_gives_each_app_its_client(tmp_path: Path) -> None:
    reflow = Reflow(workflows=[DOUBLE])
    apps = []
    for name in ("one", "two"):
        app = Flask(name)
        app.config["REFLOW_STORAGE"] = f"sqlite:///{tmp_path}/{name}.db"
        app.config["REFLOW_CLIENT_OPTIONS"] = {"poll_interval": "100ms"}
        reflow.init_app(app)

        @app.post("/double/<int:n>")
        def enqueue(n: int) -> dict[str, str]:
            return {"run_id": reflow.client.enqueue(DOUBLE, {"n": n}).id}

        apps.append(app)
    try:
        first = apps[0].test_client().post("/double/3").get_json()["run_id"]
        second = apps[1].test_client().post("/double/4").get_json()["run_id"]
        one, two = (Reflow.client_for(app) for app in apps)
        assert one is not two
        assert [r.id for r in one.list_runs().runs] == [first]
        assert [r.id for r in two.list_runs().runs] == [second]
        assert one.get_run(first).input == {"n": 3}  # type: ignore[union-attr]
    finally:
        for app in apps:
            Reflow.client_for(app).close()


def test_the_flask_extension_needs_a_storage_url() -> None:
    with pytest.raises(ConfigError, match=r"app.config\['REFLOW_STORAGE'\]"):
        Reflow(Flask("x"))


def test_a_flask_app_without_the_extension_says_so() -> None:
    app = Flask("bare")
    with pytest.raises(RuntimeError, match="init_app\\(\\) was not called on the Flask app 'bare'"):
        Reflow.client_for(app)


# -- Django ------------------------------------------------------------------------------

_WORKFLOWS_MODULE = """
from reflow_core import workflow


def step(ctx):
    return ctx.input


first = workflow("first", input=dict).step("one", step)
second = workflow("second", input=dict).step("one", step)
both = [first, second]
nothing = 42
"""


_DB_WORKFLOWS_MODULE = """
from django.db import connection

from reflow_core import workflow


def query_then_break(ctx):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    # What a database restart does to the thread's connection, unknown to Django.
    connection.connection.close()
    return ctx.prev


flow = workflow("db", input=dict)
for n in range(10):
    flow = flow.step(f"s{n}", query_then_break)
"""


@pytest.fixture(scope="module")
def django_setup() -> None:
    if not settings.configured:
        settings.configure(
            # A file: Django never closes a connection to an in-memory database.
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.sqlite3",
                    "NAME": str(Path(tempfile.mkdtemp()) / "django.sqlite3"),
                }
            },
            INSTALLED_APPS=["reflow_core.contrib.django"],
            REFLOW={"STORAGE": "memory://"},
            USE_TZ=True,
        )
        django.setup()


@pytest.fixture
def reflow_store(
    django_setup: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A ``REFLOW`` setting on a SQLite store of the test's own, with the
    workflows of a module written for the test."""
    (tmp_path / "shop_flows.py").write_text(textwrap.dedent(_WORKFLOWS_MODULE))
    (tmp_path / "db_flows.py").write_text(textwrap.dedent(_DB_WORKFLOWS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    url = f"sqlite:///{tmp_path}/reflow.db"
    conf = {"STORAGE": url, "WORKFLOWS": ["shop_flows"], "CLIENT": {"poll_interval": "100ms"}}
    with override_settings(REFLOW=conf):
        yield url
    # override_settings' end made the next client() a new one; close this test's.


def _runs(url: str) -> list[str]:
    with SyncClient(url) as client:
        return [run.workflow for run in client.list_runs().runs]


def test_a_rolled_back_transaction_enqueues_nothing(reflow_store: str) -> None:
    class Refused(Exception):
        pass

    asked: list[Future[Run]] = []

    def refuse() -> None:
        with transaction.atomic():
            asked.append(reflow_django.enqueue_on_commit("first", {"n": 1}))
            raise Refused

    with pytest.raises(Refused):
        refuse()
    assert _runs(reflow_store) == []
    assert not asked[0].done()

    with transaction.atomic():
        future = reflow_django.enqueue_on_commit("first", {"n": 2}, idempotency_key="k")
        assert not future.done()
    run = future.result(0)
    assert run.created
    assert run.input == {"n": 2}
    assert _runs(reflow_store) == ["first"]


def test_the_run_waits_for_the_outermost_commit(reflow_store: str) -> None:
    with transaction.atomic():
        with transaction.atomic():
            future = reflow_django.enqueue_on_commit("second", {"n": 1})
        # The inner block is only a savepoint.
        assert not future.done()
        assert _runs(reflow_store) == []
    assert future.result(0).workflow == "second"


def test_a_rolled_back_savepoint_drops_its_run(reflow_store: str) -> None:
    with transaction.atomic():
        kept = reflow_django.enqueue_on_commit("first", {"n": 1})
        with contextlib.suppress(ValueError), transaction.atomic():
            reflow_django.enqueue_on_commit("second", {"n": 2})
            raise ValueError
    assert kept.result(0).workflow == "first"
    assert _runs(reflow_store) == ["first"]


def test_outside_a_transaction_it_enqueues_at_once(reflow_store: str) -> None:
    assert connection.get_autocommit()
    future = reflow_django.enqueue_on_commit("first", {"n": 1})
    assert future.result(0).workflow == "first"


def test_a_wrong_workflow_or_input_fails_inside_the_transaction(reflow_store: str) -> None:
    with transaction.atomic():
        with pytest.raises(WorkflowNotFoundError, match="'nope'"):
            reflow_django.enqueue_on_commit("nope", {})
        with pytest.raises(ValidationError):
            reflow_django.enqueue_on_commit(DOUBLE, {"n": "seven"})
        with pytest.raises(TypeError, match="must be a Workflow or its name"):
            reflow_django.enqueue_on_commit(42, {})  # type: ignore[arg-type]
    assert _runs(reflow_store) == []


def test_the_client_is_one_per_process_and_follows_the_setting(reflow_store: str) -> None:
    client = reflow_django.client()
    assert reflow_django.client() is client
    assert sorted(wf.name for wf in client.workflows) == ["first", "second"]
    with override_settings(REFLOW={"STORAGE": "memory://"}):
        assert reflow_django.client() is not client
    with pytest.raises(EngineClosedError):
        client.list_runs()


def test_the_worker_engine_has_the_settings_workflows_and_options(
    reflow_store: str,
) -> None:
    conf = {**settings.REFLOW, "WORKER": {"concurrency": 3}}
    with override_settings(REFLOW=conf):
        engine = reflow_django.engine()
    assert sorted(engine.workflow_names) == ["first", "second"]
    assert engine.concurrency == 3


def test_a_broken_connection_is_replaced_before_the_next_step(reflow_store: str) -> None:
    """Each step breaks its thread's database connection behind Django's
    back; the worker's engine closes it after the step, as Django does after
    a request, so the next step (often in the same thread) opens a new one."""
    conf = {
        **settings.REFLOW,
        "WORKFLOWS": ["db_flows"],
        "WORKER": {"concurrency": 1, "poll_interval": "50ms"},
    }
    with override_settings(REFLOW=conf):
        engine = reflow_django.engine()

    async def run() -> Any:
        async with engine:
            started = await engine.enqueue("db", {})
            return await engine.result(started.id, timeout="20s")

    assert asyncio.run(run()) == {}


@pytest.mark.parametrize(
    ("workflows", "names"),
    [
        (["shop_flows"], ["first", "second"]),
        (["shop_flows.first"], ["first"]),
        (["shop_flows.both", "shop_flows.first"], ["first", "second"]),
    ],
)
def test_workflows_by_module_or_dotted_path(
    reflow_store: str, workflows: list[str], names: list[str]
) -> None:
    assert [wf.name for wf in reflow_django.load_workflows(workflows)] == names


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("shop_flows.nothing", "'shop_flows.nothing' is a int, not a workflow"),
        ("shop_flows.missing", "cannot import 'shop_flows.missing'"),
        ("textwrap", "module 'textwrap' defines no workflow"),
        ("no_such_module.flows", "cannot import 'no_such_module.flows'"),
    ],
)
def test_a_wrong_workflow_path_is_an_improper_configuration(
    reflow_store: str, path: str, message: str
) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        reflow_django.load_workflows([path])


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        (None, "add REFLOW = "),
        ({"STORAGE": "nowhere"}, '"STORAGE" must be a storage URL'),
        ({"STORAGE": "memory://", "WORKFLOW": []}, "unknown key"),
        ({"STORAGE": "memory://", "WORKFLOWS": "shop_flows"}, "list of dotted paths"),
        ({"STORAGE": "memory://", "WORKER": ["x"]}, '"WORKER" must be a dict'),
        ({"STORAGE": "memory://", "CLIENT": {"storage": "x"}}, "must not set storage"),
    ],
)
def test_a_wrong_setting_names_what_is_wrong(django_setup: None, conf: Any, message: str) -> None:
    with override_settings(REFLOW=conf), pytest.raises(ImproperlyConfigured, match=message):
        reflow_django.reflow_settings()
