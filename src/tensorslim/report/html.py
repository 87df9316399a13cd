"""A single self-contained report.html: tables plus PNG plots embedded as data URIs."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorslim.report.tables import human
from tensorslim.train.checkpoint import atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1d1d1f;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f6}td.text,th.text{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
.note{color:#555;font-size:.85rem}
"""
TEXT_COLUMNS = {"layer", "type", "method", "choice", "reason", "budget", "model", "scheme", "stage"}


def _css(column: str) -> str:
    return "text" if column in TEXT_COLUMNS else ""


def html_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """An HTML table, numbers formatted like the terminal tables."""
    head = "".join(
        f'<th class="{"text" if c in TEXT_COLUMNS else ""}">{html.escape(c)}</th>' for c in columns
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="{_css(c)}">{html.escape(human(row.get(c)))}</td>' for c in columns
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def embedded_image(path: Path, alt: str) -> str:
    """<img> with the PNG inlined, so the page opens offline as one file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_html(
    path: str | Path,
    *,
    title: str,
    sections: Sequence[tuple[str, str]],
) -> Path:
    """Write the page; ``sections`` are (heading, inner HTML) pairs."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, inner in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{inner}")
    parts.append("</body></html>")
    path = Path(path)
    atomic_write_text(path, "\n".join(parts))
    return path
