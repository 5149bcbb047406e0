"""A single self-contained HTML report: tables, inline PNG plots, before/after generations.

No scripts, fonts or images are fetched: plots are embedded as base64 data URIs, so the file can be
mailed, archived or opened offline and looks the same everywhere.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2330;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde2ea}
.sub{color:#5b6475;margin-top:0}table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem}
th,td{border:1px solid #d5dbe5;padding:.35rem .6rem;text-align:left;vertical-align:top}
th{background:#f2f5f9}td.num{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{font-weight:600;background:#f8fafc}figure{margin:1rem 0}
img{max-width:100%;border:1px solid #e4e8ef}figcaption{color:#5b6475;font-size:.88rem}
pre{background:#f5f7fa;padding:.6rem;border-radius:4px;white-space:pre-wrap;font-size:.85rem;margin:0}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:.6rem;margin:.4rem 0 1.2rem}
.pair h4{margin:.2rem 0;font-size:.85rem;color:#5b6475}.prompt{font-weight:600;margin-top:1rem}
code{background:#f0f3f7;padding:.1rem .3rem;border-radius:3px}
.verdicts{border:2px solid #1d2330;border-radius:6px;padding:.4rem 1rem;margin:1rem 0}
.verdicts li{margin:.2rem 0}.reliable{color:#1b7a33;font-weight:700}.none{color:#8a5a00;font-weight:700}
.wrong{color:#b01f1f;font-weight:700}
"""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Example:
    prompt: str
    before: str
    after: str


@dataclass
class ReportContent:
    """What a recipe wants shown; `render_html` turns it into one file."""

    title: str
    subtitle: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    examples_labels: tuple[str, str] = ("before (unmodified model)", "after (with the intervention)")
    commands: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    verdicts: list[tuple[str, str, str]] = field(default_factory=list)
    """(row, verdict label, why) shown first, above everything else: how much to believe each result."""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in table.rows)
    note = f"<p class='sub'>{html.escape(table.note)}</p>" if table.note else ""
    return f"<h2>{html.escape(table.title)}</h2>{note}<table><tr>{head}</tr>{body}</table>"


def _image(title: str, path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (
        f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
    )


def _kv(rows: dict[str, Any]) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td>{_cell(v)}</tr>" for k, v in rows.items())
    return f"<table class='kv'>{body}</table>"


def _examples(examples: Sequence[Example], labels: tuple[str, str]) -> str:
    parts = ["<h2>Generations side by side</h2>"]
    for ex in examples:
        parts.append(f"<div class='prompt'>{html.escape(ex.prompt)}</div><div class='pair'>")
        for label, text in zip(labels, (ex.before, ex.after), strict=True):
            parts.append(f"<div><h4>{html.escape(label)}</h4><pre>{html.escape(text)}</pre></div>")
        parts.append("</div>")
    return "".join(parts)


def _verdicts(verdicts: Sequence[tuple[str, str, str]]) -> str:
    """The verdict box at the top of the report (labels of `finesteer.evaluate.effect_verdict`)."""
    items = []
    for name, label, why in verdicts:
        css = "reliable" if label == "reliable effect" else "wrong" if "wrong" in label else "none"
        detail = f" — {html.escape(why)}" if why else ""
        items.append(f"<li>{html.escape(name)}: <span class='{css}'>{html.escape(label)}</span>{detail}</li>")
    return f"<div class='verdicts' id='verdict'><h2>Verdict</h2><ul>{''.join(items)}</ul></div>"


def render_html(content: ReportContent, path: str | Path) -> Path:
    """Write the report; returns its path."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(content.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(content.title)}</h1>",
    ]
    if content.subtitle:
        parts.append(f"<p class='sub'>{html.escape(content.subtitle)}</p>")
    if content.verdicts:
        parts.append(_verdicts(content.verdicts))
    if content.summary:
        parts.append("<h2>Summary</h2>" + _kv(content.summary))
    parts.extend(_table(t) for t in content.tables)
    if content.images:
        parts.append("<h2>Plots</h2>")
        parts.extend(_image(title, p) for title, p in content.images if Path(p).is_file())
    if content.examples:
        parts.append(_examples(content.examples, content.examples_labels))
    if content.commands:
        parts.append("<h2>Reproduce</h2>" + "".join(f"<pre>{html.escape(c)}</pre>" for c in content.commands))
    if content.environment:
        parts.append("<h2>Environment</h2>" + _kv(content.environment))
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path
