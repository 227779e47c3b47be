"""The one module that writes reports: standalone HTML that opens offline.

plotly.js is embedded once in the page head, so the file works from a ``file://`` URL with
no network. Static PNG/SVG copies are written too where an exporter (kaleido) is installed.
"""

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.offline

from mlsae_lens.atomic import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class ReportSection:
    """A heading with any mix of paragraphs (HTML), figures and key/value tables."""

    title: str
    html: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    table: dict[str, Any] | None = None


def table_html(rows: dict[str, Any]) -> str:
    """Key/value rows; nested dicts become nested tables so configs read as tables, not JSON."""
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{_cell_html(v)}</td></tr>" for k, v in rows.items()
    )
    return f"<table>{body}</table>"


def _cell_html(value: Any) -> str:
    if isinstance(value, dict):
        return table_html(value) if value else "—"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "".join(_cell_html(v) for v in value) or "—"
    return html.escape(format_value(value))


def format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value) if value else "—"
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 0.9em; }
th { background: #f4f4f4; vertical-align: top; }
td table { margin: 0; } td table th { background: #fafafa; font-weight: normal; }
section { margin-bottom: 2.5em; }
"""


def render_report(title: str, sections: list[ReportSection]) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>",
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>{section.html}")
        if section.table:
            parts.append(table_html(section.table))
        for fig in section.figures:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: Path, title: str, sections: list[ReportSection]) -> Path:
    """Write the HTML report atomically and return its path."""
    path = Path(path)
    atomic_write_text(path, render_report(title, sections))
    return path
