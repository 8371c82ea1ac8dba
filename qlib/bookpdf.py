"""The book as a PDF: Jupyter Book's LaTeX builder with Debian's TeX Live.

``build_pdf`` says, before LaTeX runs, which chapters cannot go to the PDF as they are (not
executed, failed, outputs only a browser can show) and, after, which chapter each LaTeX error
occurred in; it copies the PDF into the HTML book, where the intro links to it. HTML tables
(DataFrames, pandas Stylers) reach the PDF through the Markdown form that ``tables_to_markdown``
gives each of them when a notebook is executed.

Command line: ``python -m qlib.book pdf``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

from qlib.book import EXECUTED_DIR, ROOT, _jupyter_book, recorded, toc_notebooks

__all__ = ["PDF_NAME", "build_pdf", "latex_errors", "pdf_problems", "tables_to_markdown"]

PDF_NAME = "qlib-book.pdf"  # the PDF's name in the HTML book, where the intro links to it


class _Tables(HTMLParser):
    """The cells of every ``<table>`` in an HTML fragment: per table, rows of
    ``[text, rowspan, colspan, is_header]``."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[list]]] = []
        self._row: list | None = None
        self._cell: list | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self._row = []
            self.tables[-1].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            span = int(a.get("rowspan") or 1), int(a.get("colspan") or 1)
            self._cell = ["", *span, tag == "th"]
            self._row.append(self._cell)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


_MARKDOWN_ESCAPE = set("\\`*_[]<>|$#~")


def _markdown_table(rows: list[list[list]]) -> str:
    """A GFM pipe table of parsed HTML rows: row and column spans laid out on a grid, the
    header rows (only ``th`` cells) merged into the one header row Markdown allows."""
    grid, header, pending = [], [], {}  # pending: column -> rows it is still spanned for
    for row in rows:
        out, cells = [], list(row)
        while True:
            col = len(out)
            if pending.get(col, 0) > 0:  # spanned from a row above
                pending[col] -= 1
                out.append(("", True))
            elif cells:
                text, rowspan, colspan, is_th = cells.pop(0)
                for k in range(colspan):
                    out.append((" ".join(text.split()) if k == 0 else "", is_th))
                    if rowspan > 1:
                        pending[col + k] = rowspan - 1
            elif any(v > 0 and c > col for c, v in pending.items()):
                out.append(("", True))
            else:
                break
        grid.append(out)
        header.append(all(is_th for _, is_th in out))
    width = max((len(r) for r in grid), default=0)
    if not width:
        return ""
    texts = [[t for t, _ in r] + [""] * (width - len(r)) for r in grid]
    n_head = next((i for i, h in enumerate(header) if not h), len(grid))
    body = [r for r, h in zip(grid, header, strict=True) if not h]
    if not body:  # an empty frame: Sphinx's LaTeX writer fails on a table without rows
        return ""
    right = [any(c < len(r) and not r[c][1] for r in body) for c in range(width)]  # data
    # A data column's header rows are levels of its label; an index column's last header row
    # names it (the rows above name the column levels, pandas-style).
    head = [[t for t in col if t] for col in zip(*texts[:n_head], strict=True)] or [[]] * width
    head = [" / ".join(h) if r else (h[-1] if h else "") for h, r in zip(head, right, strict=True)]

    def line(cells):
        esc = ("".join("\\" + ch if ch in _MARKDOWN_ESCAPE else ch for ch in t) for t in cells)
        return "| " + " | ".join(esc) + " |"

    lines = [line(head), "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
    lines += [line(r) for r in texts[n_head:]]
    return "\n".join(lines)


def tables_to_markdown(nb: dict) -> int:
    """Give every output that shows HTML tables (DataFrames, Stylers) a ``text/markdown`` form
    for the PDF book; return how many. Browsers still get the HTML (myst-nb ranks it first for
    HTML), while LaTeX, which cannot show HTML, would otherwise fall back to the plain text: a
    Styler's bare repr."""
    n = 0
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            html = data.get("text/html")
            if html is None or "text/markdown" in data or "text/latex" in data:
                continue
            parser = _Tables()
            parser.feed(html if isinstance(html, str) else "".join(html))
            tables = [t for t in (_markdown_table(rows) for rows in parser.tables) if t]
            if tables:
                data["text/markdown"] = "\n\n".join(tables)
                n += 1
    return n


# MIME types that Sphinx's LaTeX writer can show; an output with none of them is left out.
_LATEX_MIMES = ("image/png", "image/jpeg", "application/pdf", "text/latex", "text/plain")


def pdf_problems(stems: list[str], nb_dir: Path = ROOT / EXECUTED_DIR) -> dict[str, str]:
    """Chapters that cannot go to the PDF as they are, before any LaTeX runs: not executed,
    failed, or with outputs that only a browser can show. Maps stem to the reason."""
    problems: dict[str, str] = {}
    for stem in stems:
        o = recorded(stem, nb_dir)
        if o.status == "not executed":
            problems[stem] = "not executed (run `python -m qlib.book run` first)"
            continue
        if o.status == "failed":
            problems[stem] = f"its execution failed ({o.error or 'see the executed notebook'})"
            continue
        nb = json.loads((Path(nb_dir) / f"{stem}.ipynb").read_text())
        lost = []
        for i, cell in enumerate(nb.get("cells", [])):
            for out in cell.get("outputs", []):
                data = out.get("data")
                if data and not any(m in data for m in _LATEX_MIMES):
                    lost.append(f"cell {i} ({', '.join(sorted(data))})")
        if lost:
            problems[stem] = "outputs only a browser can show, left out: " + "; ".join(lost)
    return problems


def latex_errors(tex: Path) -> dict[str, list[str]]:
    """LaTeX errors of the run that compiled ``tex``, by the chapter they occurred in (read from
    the ``.log`` beside it: each ``! message`` with its ``l.<line>`` mapped to the last
    ``\\chapter`` before that line of ``tex``)."""
    log = tex.with_suffix(".log")
    if not log.is_file():
        return {}
    chapters = []  # (line number, title)
    for n, line in enumerate(tex.read_text(errors="replace").splitlines(), 1):
        m = re.match(r"\\chapter\*?\{(.*?)\}", line.strip())
        if m:
            chapters.append((n, m.group(1)))
    found: dict[str, list[str]] = {}
    message = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("! "):
            message = line[2:].strip()
        elif message is not None:
            m = re.match(r"l\.(\d+)", line)
            if m:
                n = int(m.group(1))
                where = [t for start, t in chapters if start <= n]
                # Errors in a package, or before the first chapter, land in the preamble.
                found.setdefault(where[-1] if where else "preamble", []).append(message)
                message = None
    return found


def build_pdf(
    source: Path = ROOT, html_dir: Path | None = None, out: Path | None = None
) -> Path | None:
    """Build the PDF book with Jupyter Book's LaTeX builder and TeX Live, copy it into the HTML
    book (where the intro links to it) and print which chapters could not go to the PDF and
    why. Returns the PDF's path, or ``None`` if no PDF was written."""
    source = Path(source)
    base = Path(out or source)
    stems = toc_notebooks(source / "_toc.yml")
    for stem, why in pdf_problems(stems, source / EXECUTED_DIR).items():
        print(f"[qlib.book pdf] chapter {stem}: {why}", flush=True)
    log = base / "_build" / "pdf-build.log"
    start = time.perf_counter()
    rc = _jupyter_book(source, "pdflatex", out, log)
    seconds = time.perf_counter() - start
    latex = base / "_build" / "latex"
    pdfs = sorted(latex.glob("*.pdf"))
    for tex in sorted(latex.glob("*.tex")):
        for chapter, messages in latex_errors(tex).items():
            shown = "; ".join(dict.fromkeys(messages))
            print(f"[qlib.book pdf] LaTeX errors in chapter '{chapter}': {shown}", flush=True)
    if not pdfs:
        lines = log.read_text().splitlines()
        # Sphinx's own failure (before LaTeX ran) says what broke right after this line.
        cause = [i for i, line in enumerate(lines) if "Exception occurred" in line]
        tail = "\n".join(lines[cause[0] : cause[0] + 8] if cause else lines[-25:])
        print(f"[qlib.book pdf] no PDF written (exit {rc}); end of {log}:\n{tail}", file=sys.stderr)
        return None
    pdf = pdfs[0]
    html_dir = Path(html_dir or base / "_build" / "html")
    html_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(pdf, html_dir / PDF_NAME)
    state = "" if rc == 0 else f" (with errors, exit {rc}; log {log})"
    print(f"[qlib.book pdf] {pdf} in {seconds:.0f} s{state}; copied to {html_dir / PDF_NAME}")
    return pdf
