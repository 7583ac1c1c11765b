"""A map: its handler sees one item as ``prev``, and the next step the list of results."""

from reflow_core import StepContext, workflow


async def fetch(ctx: StepContext[dict[str, list[str]], str]) -> int:
    return len(ctx.prev)


def total(ctx: StepContext[dict[str, list[str]], list[int]]) -> int:
    return sum(ctx.prev)


def urls(ctx: StepContext[dict[str, list[str]], dict[str, list[str]]]) -> list[str]:
    return ctx.input["urls"]


mapped = workflow("sizes", input=dict[str, list[str]]).map("fetch", urls, fetch, concurrency=5)
reveal_type(mapped)  # noqa: F821
finished = mapped.step("total", total)
