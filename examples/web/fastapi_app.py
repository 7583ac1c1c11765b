"""FastAPI: one route enqueues an order, another awaits its result.

    REFLOW_URL=sqlite:///shop.db reflow worker shop:make_engine &
    REFLOW_URL=sqlite:///shop.db uvicorn fastapi_app:app

    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"item": "tea", "quantity": 2}'
    curl localhost:8000/orders/RUN_ID/result
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from shop import Order, place_order, storage_url

from reflow_core import ResultTimeoutError, RunFailedError, RunNotFoundError
from reflow_core.contrib.fastapi import EngineDep, reflow_lifespan

# The engine starts with the app and stops with it. It runs no worker here:
# `reflow worker` processes execute the runs (worker=True would run them in
# the web server's processes too).
app = FastAPI(lifespan=reflow_lifespan(storage_url(), workflows=[place_order]))


class OrderIn(BaseModel):
    item: str
    quantity: int = Field(gt=0)


@app.post("/orders", status_code=202)
async def create_order(order: OrderIn, engine: EngineDep) -> dict[str, str]:
    run = await engine.enqueue(place_order, Order(order.item, order.quantity))
    return {"run_id": run.id}


@app.get("/orders/{run_id}")
async def order_status(run_id: str, engine: EngineDep) -> dict[str, Any]:
    run = await engine.get_run(run_id)
    if run is None:
        raise HTTPException(404, f"no order run {run_id}")
    return {"run_id": run.id, "status": run.status, "output": run.output}


@app.get("/orders/{run_id}/result")
async def order_result(run_id: str, engine: EngineDep, timeout: float = 10) -> Any:
    try:
        return await engine.result(run_id, timeout=timeout)
    except RunNotFoundError:
        raise HTTPException(404, f"no order run {run_id}") from None
    except RunFailedError as exc:
        raise HTTPException(409, f"the order failed: {exc.info.get('message')}") from None
    except ResultTimeoutError:
        raise HTTPException(504, "the order is not done yet; ask again") from None
