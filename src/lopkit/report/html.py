"""A single self-contained HTML page (images inlined as base64) from PNG files and a summary table."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; } .grid figure { margin: 0; }
.grid figure { width: 560px; max-width: 100%; }
.grid img { width: 560px; max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
"""


def inline_png(path: Path) -> str:
    """A data: URI holding the PNG at ``path``."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_page(title: str, intro: str, sections: list[tuple[str, list[Path | tuple[Path, list[str]]]]],
                tables: list[tuple[str, pd.DataFrame]], notes: list[str]) -> str:
    """The HTML text: title, notes, summary tables, then one section of inlined figures per group.

    A figure is a PNG path, or (path, caption lines) to print the lines under the image.
    """
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>{html.escape(intro)}</p>"]
    for note in notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for caption, table in tables:
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(table.to_html(border=0, na_rep="–", escape=True))
    for heading, images in sections:
        if not images:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2><div class='grid'>")
        for item in images:
            image, caption = (item[0], list(item[1])) if isinstance(item, tuple) else (item, [])
            text = (f"<figcaption class='note'>{'<br>'.join(html.escape(line) for line in caption)}</figcaption>"
                    if caption else "")
            parts.append(f"<figure><img alt='{html.escape(Path(image).stem)}' src='{inline_png(image)}'>{text}</figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
