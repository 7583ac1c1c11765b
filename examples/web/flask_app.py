"""Flask: one route enqueues an order, another waits for its result, with
the blocking client (one per process, shared by every thread).

    REFLOW_URL=sqlite:///shop.db reflow worker shop:make_engine &
    REFLOW_URL=sqlite:///shop.db gunicorn --workers 2 --threads 8 --preload flask_app:app

    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"item": "tea", "quantity": 2}'
    curl localhost:8000/orders/RUN_ID/result
"""

from __future__ import annotations

from typing import Any

from flask import Flask, abort, request
from shop import Order, place_order, storage_url

from reflow_core import ResultTimeoutError, RunFailedError, RunNotFoundError, ValidationError
from reflow_core.contrib.flask import Reflow

reflow = Reflow(workflows=[place_order])


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["REFLOW_STORAGE"] = storage_url()
    reflow.init_app(app)

    @app.post("/orders")
    def create_order() -> tuple[dict[str, str], int]:
        body = request.get_json(force=True)
        try:
            run = reflow.client.enqueue(place_order, Order(body["item"], int(body["quantity"])))
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            abort(422, f"not an order: {exc}")
        return {"run_id": run.id}, 202

    @app.get("/orders/<run_id>")
    def order_status(run_id: str) -> dict[str, Any]:
        run = reflow.client.get_run(run_id)
        if run is None:
            abort(404, f"no order run {run_id}")
        return {"run_id": run.id, "status": run.status, "output": run.output}

    @app.get("/orders/<run_id>/result")
    def order_result(run_id: str) -> Any:
        timeout = request.args.get("timeout", 10.0, type=float)
        try:
            return reflow.client.result(run_id, timeout=timeout)
        except RunNotFoundError:
            abort(404, f"no order run {run_id}")
        except RunFailedError as exc:
            abort(409, f"the order failed: {exc.info.get('message')}")
        except ResultTimeoutError:
            abort(504, "the order is not done yet; ask again")

    return app


app = create_app()
