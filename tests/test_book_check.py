"""qlib.bookcheck on two hand-made pages in headless Chromium: one as a built chapter should be,
one with every fault the checker must see. Budget: about 10 s."""

import base64
import os
from pathlib import Path

import pytest

from qlib import bookcheck

# One pixel, black, as PNG.
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def _mathjax() -> str:
    import importlib

    package = Path(importlib.import_module("sphinx-mathjax-offline").__file__).parent
    return (package / "static" / "mathjax" / "tex-chtml.js").as_uri()


def _page(body: str, head: str = "", up: str = "../", ch: str = "") -> str:
    """A page with a sidebar that links the three pages of the toc (``up`` and ``ch`` make the
    links relative to where the page lies)."""
    links = [f"{up}intro.html", f"{ch}good.html", f"{ch}bad.html", f"{ch}absent.html"]
    nav = '<nav class="bd-docs-nav">' + "".join(f'<a href="{u}">-</a>' for u in links) + "</nav>"
    return f"<html><head>{head}</head><body>{nav}<article>{body}</article></body></html>"


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    if bookcheck.find_chromium() is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "chromium and chromium-driver are missing in CI: tools/sysdeps.sh installs them"
            )
        pytest.skip(
            "chromium and chromium-driver are not installed (apt-get install chromium "
            "chromium-driver, or make setup)"
        )
    root = tmp_path_factory.mktemp("site")
    toc = root / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: intro\nchapters:\n  - file: ch/good\n  - file: ch/bad\n"
        "  - file: ch/absent\n"
    )
    html = root / "html"
    (html / "ch").mkdir(parents=True)
    (html / "intro.html").write_text(_page("<p>No math here.</p>", up="", ch="ch/"))
    (html / "ch" / "pixel.png").write_bytes(base64.b64decode(PIXEL))
    (html / "ch" / "good.html").write_text(
        _page(
            '<p>Inline <span class="math">\\(x^2\\)</span>.</p>'
            '<div class="math">\\[\\int_0^1 x\\,dx\\]</div><img src="pixel.png">'
            f'<div class="cell_output"><pre style="white-space: pre-wrap">{"long " * 400}</pre></div>'
            "<pre>print(r'\\[ in code is fine')</pre>",
            head=f'<script defer src="{_mathjax()}"></script>',
        )
    )
    (html / "ch" / "bad.html").write_text(
        _page(
            '<p>Raw <span class="math">\\(x^2\\)</span> and $$y$$.</p><img src="missing.png">'
            '<div class="cell_output"><pre>Traceback (most recent call last):\n  ...</pre></div>'
            f'<div class="cell_output"><pre>{"long " * 400}</pre></div>',
            head='<script src="https://cdn.example.org/mathjax.js"></script>',
        ).replace('<a href="../intro.html">-</a>', "")
    )
    result = bookcheck.check_book(html, toc, screenshots=root / "shots", timeout=20)
    return {c.page: c for c in result}


def test_a_good_page_passes_with_math_typeset_and_a_screenshot(checks):
    good = checks["ch/good.html"]
    assert good.problems == ()
    assert good.math == 2 and good.images == 1
    assert good.screenshot is not None and good.screenshot.stat().st_size > 1000
    assert checks["intro.html"].problems == ()


def test_every_fault_of_a_bad_page_is_named(checks):
    problems = " | ".join(checks["ch/bad.html"].problems)
    assert "MathJax did not load" in problems
    assert "1 formulas left as TeX" in problems and "'$$'" in problems
    assert "images not loaded: ['missing.png']" in problems
    assert "1 output cells show a traceback" in problems
    assert "1 outputs run off the right edge" in problems
    assert "sidebar lacks ['intro.html']" in problems
    assert "https://cdn.example.org/mathjax.js" in problems


def test_a_page_that_was_not_built_is_reported(checks):
    assert checks["ch/absent.html"].problems[0].endswith("ch/absent.html was not built")
