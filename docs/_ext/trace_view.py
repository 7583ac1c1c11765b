"""Render a trace dumped by the cross-process tracing test as a waterfall
page, and screenshot it for the docs with headless Chromium::

    REFLOW_TRACE_DUMP=/tmp/trace.json pytest reflow_core/tests/test_otel_processes.py -k sqlite
    python docs/_ext/trace_view.py /tmp/trace.json docs/images/trace-reclaimed.png

The page is self-contained (no script, no font or style fetched from
anywhere); each row is one exported span, indented under its parent, its
bar placed on the trace's time line, with the process that exported it and
the span's Reflow attributes.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_STYLE = """
body { font: 13px/1.4 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif;
       margin: 24px; color: #1f2328; background: #fff; }
h1 { font-size: 16px; margin: 0 0 4px; }
.sub { color: #57606a; margin-bottom: 16px; }
table { border-collapse: collapse; width: 100%; }
td { padding: 6px 8px; border-bottom: 1px solid #eaeef2; vertical-align: top; }
.name { white-space: nowrap; width: 260px; }
.proc { color: #57606a; white-space: nowrap; width: 140px; }
.lane { position: relative; height: 18px; }
.bar { position: absolute; top: 2px; height: 14px; border-radius: 3px; min-width: 3px; }
.PRODUCER { background: #8250df; } .CONSUMER { background: #0969da; }
.INTERNAL { background: #1a7f37; } .SERVER { background: #6e7781; }
.ERROR { background: #cf222e; }
.dur { color: #57606a; white-space: nowrap; width: 80px; text-align: right; }
.attrs { color: #57606a; font-size: 12px; }
.gap { color: #9a6700; font-size: 12px; }
"""


def _label(span: dict[str, Any], test_pid: int | None) -> str:
    pid = span.get("pid")
    if pid is None or pid == test_pid:
        return "web app (enqueues)"
    return f"worker pid {pid}"


def render(spans: list[dict[str, Any]]) -> str:
    """The waterfall page of ``spans`` (one trace)."""
    spans = sorted(spans, key=lambda s: s["start_time"])
    by_id = {s["span_id"]: s for s in spans}
    start = min(s["start_time"] for s in spans)
    end = max(s["end_time"] for s in spans)
    total = max(end - start, 1)
    test_pid = spans[0].get("pid")

    def depth(span: dict[str, Any]) -> int:
        parent = by_id.get(span.get("parent_id") or "")
        return 0 if parent is None else 1 + depth(parent)

    rows = []
    for span in spans:
        left = (span["start_time"] - start) / total * 100
        width = (span["end_time"] - span["start_time"]) / total * 100
        status = "ERROR" if span.get("status") == "ERROR" else span.get("kind", "INTERNAL")
        attrs = {k: v for k, v in (span.get("attributes") or {}).items() if k.startswith("reflow.")}
        shown = ", ".join(f"{k}={v}" for k, v in attrs.items() if k != "reflow.workflow")
        ms = (span["end_time"] - span["start_time"]) / 1e6
        rows.append(
            "<tr>"
            f'<td class="name" style="padding-left:{8 + 18 * depth(span)}px">'
            f"{html.escape(span['name'])}</td>"
            f'<td class="proc">{html.escape(_label(span, test_pid))}</td>'
            f'<td><div class="lane"><div class="bar {status}" '
            f'style="left:{left:.2f}%;width:{width:.2f}%"></div></div>'
            f'<div class="attrs">{html.escape(shown)}</div></td>'
            f'<td class="dur">{ms:.1f} ms</td>'
            "</tr>"
        )
    trace_id = spans[0]["trace_id"]
    seconds = total / 1e9
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{_STYLE}</style></head>"
        f"<body><h1>Trace {html.escape(trace_id)}</h1>"
        f"<div class='sub'>{len(spans)} spans over {seconds:.2f} s: the request that "
        "enqueued the run, and the run on the worker that took it over after the first "
        "worker was killed mid-step (that worker's spans never ended, so none was "
        "exported; the gap is its lease lapsing)</div>"
        f"<table>{''.join(rows)}</table></body></html>"
    )


def screenshot(page: str, out: Path, *, width: int = 1100, height: int = 390) -> None:
    """Save ``page`` as a PNG with headless Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "trace.html"
        source.write_text(page, encoding="utf-8")
        subprocess.run(  # noqa: S603
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={tmp}/profile",
                f"--window-size={width},{height}",
                f"--screenshot={out.resolve()}",
                source.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )


def main() -> None:
    dump, out = Path(sys.argv[1]), Path(sys.argv[2])
    spans = json.loads(dump.read_text(encoding="utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    screenshot(render(spans), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
