"""Reflow demo: a map-reduce over a list of URLs, each page fetched and saved once.

    python examples/map_reduce_urls.py [--db PATH] [--pages N]

Serves N small pages from a local HTTP server (so the demo needs no network),
then runs a workflow on a SQLite file: ``.map()`` fetches every URL of the
input (at most 8 at once, each with its own retries), saving each page's word
count as its own step as soon as it is fetched; a last step adds them up. A
worker that dies halfway would, after a restart, fetch only the pages not
saved yet.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from reflow_core import Engine, Retry, StepContext, open_storage, workflow

Crawl = dict[str, list[str]]


def fetch(ctx: StepContext[Crawl, str]) -> dict[str, Any]:
    """A plain ``def``: it runs in a worker thread, ``ctx.item`` is one URL."""
    with urllib.request.urlopen(ctx.item, timeout=5) as response:
        text = response.read().decode()
    return {"url": ctx.item, "words": len(text.split())}


def reduce(ctx: StepContext[Crawl, list[dict[str, Any]]]) -> dict[str, Any]:
    largest = max(ctx.prev, key=lambda page: page["words"])
    return {
        "pages": len(ctx.prev),
        "words": sum(page["words"] for page in ctx.prev),
        "largest": largest["url"].rsplit("/", 1)[-1],
    }


crawl = (
    workflow("crawl")
    .map(
        "fetch",
        lambda ctx: ctx.input["urls"],
        fetch,
        concurrency=8,
        retry=Retry(max_attempts=3, initial_delay="100ms"),
        timeout="10s",
    )
    .step("reduce", reduce)
)


class _Pages(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        number = int(self.path.rsplit("/", 1)[-1])
        body = " ".join(["word"] * (number % 7 + 1) * 10).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def local_site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def main(db: Path, pages: int) -> int:
    with local_site() as site:
        urls = [f"{site}/page/{n}" for n in range(pages)]
        storage = open_storage(f"sqlite:///{db}")
        async with Engine(storage=storage, workflows=[crawl], poll_interval="100ms") as engine:
            run = await engine.enqueue(crawl, {"urls": urls})
            result = await engine.result(run.id, timeout="60s")
            done = await engine.get_run_status(run.id)
    saved = sum(1 for name in done.steps if name.startswith("fetch["))
    print(f"fetched {result['pages']} pages, {result['words']} words in all")
    print(f"largest page: {result['largest']}")
    print(f"{saved} page results saved as steps fetch[0] ... fetch[{pages - 1}]")
    return 0 if saved == pages == result["pages"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    parser.add_argument("--pages", type=int, default=40, help="how many pages to fetch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raise SystemExit(asyncio.run(main(args.db or Path(tmp) / "crawl.db", args.pages)))
