"""The blocking client keeps the engine's signatures for type checkers:
its calls are plain (not awaitable), with the same results and overloads."""

from reflow_core import SyncClient, workflow

wf = workflow("w", input=dict)
client = SyncClient("sqlite:///typing.db", workflows=[wf])

reveal_type(client.enqueue(wf, {}))  # noqa: F821
reveal_type(client.enqueue_many(wf, [{}]))  # noqa: F821
reveal_type(client.enqueue_many(wf, [{}], return_exceptions=True))  # noqa: F821
reveal_type(client.wait(["a"], timeout="1s"))  # noqa: F821
reveal_type(client.get_run("a"))  # noqa: F821
client.enqueue(wf, {}, priority="high")
