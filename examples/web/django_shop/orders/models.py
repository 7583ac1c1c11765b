from django.db import models


class Order(models.Model):
    """An order, saved by the view; the workflow confirms it."""

    item = models.CharField(max_length=50)
    quantity = models.PositiveIntegerField()
    status = models.CharField(max_length=20, default="placed")
    total_cents = models.IntegerField(null=True)
    run_id = models.CharField(max_length=64, blank=True, default="")
