"""The order views: one saves an order and enqueues its run when the save
commits; the others read the order and wait for the run's result."""

from __future__ import annotations

import json

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from reflow_core import ResultTimeoutError, RunFailedError
from reflow_core.contrib.django import client, enqueue_on_commit

from .models import Order
from .workflows import OrderInput, place_order

IN_STOCK = {"tea": 100, "coffee": 100, "cake": 12}


class OutOfStock(Exception):
    pass


def reserve(order: Order) -> None:
    if order.quantity > IN_STOCK.get(order.item, 0):
        raise OutOfStock(f"only {IN_STOCK.get(order.item, 0)} {order.item} left")


@csrf_exempt
@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    body = json.loads(request.body)
    try:
        with transaction.atomic():
            order = Order.objects.create(item=body["item"], quantity=int(body["quantity"]))
            queued = enqueue_on_commit(
                place_order,
                OrderInput(order.pk, order.item, order.quantity),
                idempotency_key=f"order-{order.pk}",
            )
            # Raising here rolls the order back, and no run is enqueued.
            reserve(order)
    except OutOfStock as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    run = queued.result()  # committed: the commit enqueued the run
    Order.objects.filter(pk=order.pk).update(run_id=run.id)
    return JsonResponse({"order_id": order.pk, "run_id": run.id}, status=202)


@require_GET
def order_status(request: HttpRequest, order_id: int) -> JsonResponse:
    order = get_object_or_404(Order, pk=order_id)
    run = client().get_run(order.run_id) if order.run_id else None
    return JsonResponse(
        {
            "order_id": order.pk,
            "status": order.status,
            "total_cents": order.total_cents,
            "run_status": run.status if run else None,
        }
    )


@require_GET
def order_result(request: HttpRequest, order_id: int) -> JsonResponse:
    order = get_object_or_404(Order, pk=order_id)
    timeout = float(request.GET.get("timeout", 10))
    try:
        output = client().result(order.run_id, timeout=timeout)
    except RunFailedError as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    except ResultTimeoutError:
        return JsonResponse({"error": "not done yet; ask again"}, status=504)
    return JsonResponse(output)
