"""Reads a built HTML book in headless Chromium, as a reader without network access would.

For every page of ``_toc.yml`` it checks that the page loads from disk, that its mathematics is
typeset by the MathJax shipped inside the book (no raw ``\\(`` or ``\\[`` left), that every image
has loaded, that no output cell shows a traceback or runs off the right edge, that the sidebar
lists every chapter, that no script failed and that nothing was fetched from outside the book;
and it saves a screenshot.

Uses Debian's ``chromium`` and ``chromium-driver`` through selenium (no browser download). Command
line: ``python -m qlib.book check [HTML_DIR]``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["CHROMIUM_FLAGS", "PageCheck", "check_book", "find_chromium", "toc_pages"]

# Headless, and nothing that reaches the network on its own; host names resolve to nothing, so a
# page that needs a CDN fails here as it would for a reader offline.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--window-size=1280,1400",
)


@dataclass(frozen=True)
class PageCheck:
    """What one page showed."""

    page: str  # path of the page relative to the HTML folder, e.g. "book/nb/00_data.html"
    problems: tuple[str, ...]  # empty when the page reads as it should
    math: int  # typeset formulas (MathJax output elements)
    images: int  # images, all loaded if no problem says otherwise
    screenshot: Path | None


def find_chromium() -> tuple[str, str] | None:
    """Paths of the Chromium browser and its driver, or ``None`` if either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def toc_pages(toc: Path) -> list[str]:
    """HTML paths (relative to the HTML folder) of every file ``toc`` lists, root first."""
    pages: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            f = node.get("root") or node.get("file")
            if isinstance(f, str):
                pages.append(str(Path(f).with_suffix("")) + ".html")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(Path(toc).read_text()))
    return pages


# Runs in the page: waits for MathJax and the images, then reports what a reader would see.
_INSPECT = """
const done = arguments[arguments.length - 1];
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  await document.fonts.ready;
  const imgs = Array.from(document.querySelectorAll('main img, article img'));
  await Promise.all(imgs.map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  const article = document.querySelector('article') || document.body;
  const prose = article.cloneNode(true);
  prose.querySelectorAll('pre, code, mjx-container, script, style').forEach(e => e.remove());
  const text = prose.textContent;
  const mathNodes = Array.from(document.querySelectorAll('.math'));
  const outputs = Array.from(document.querySelectorAll('.cell_output'));
  done({
    mathjax: !!(window.MathJax && MathJax.version),
    formulas: mathNodes.length,
    math: document.querySelectorAll('mjx-container').length,
    untypeset: mathNodes.filter(e => !e.querySelector('mjx-container')).length,
    raw: ['\\\\(', '\\\\[', '$$'].filter(d => text.includes(d)),
    images: imgs.length,
    broken: imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    overflowing: outputs.flatMap(o => Array.from(o.querySelectorAll('pre')))
        .filter(p => p.scrollWidth > p.clientWidth + 1).length,
    tracebacks: outputs.filter(o => o.querySelector('.traceback') ||
        /Traceback \\(most recent call last\\)|An Exception was encountered/.test(o.textContent))
        .length,
    sidebar: Array.from(document.querySelectorAll('nav.bd-docs-nav a[href], .bd-sidebar-primary a[href]'))
        .map(a => a.href),
    fetched: performance.getEntriesByType('resource').map(e => e.name)
        .filter(n => !n.startsWith('file:') && !n.startsWith('data:')),
    remote: Array.from(document.querySelectorAll('script[src], link[rel=stylesheet][href], img[src]'))
        .map(e => e.getAttribute('src') || e.getAttribute('href'))
        .filter(u => /^(https?:)?\\/\\//.test(u)),
  });
})().catch(e => done({error: String(e)}));
"""


def _driver(browser: str, driver: str, profile_dir: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")  # fresh: no cache, no state
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    return webdriver.Chrome(service=Service(driver), options=options)


def check_book(
    html_dir: Path,
    toc: Path,
    screenshots: Path | None = None,
    timeout: float = 30.0,
) -> list[PageCheck]:
    """Open every page that ``toc`` lists from ``html_dir`` (``_build/html``) in headless
    Chromium and check it; save a screenshot per page in ``screenshots`` if given.

    Raises ``RuntimeError`` if Chromium or chromedriver is not installed.
    """
    found = find_chromium()
    if found is None:
        raise RuntimeError(
            "headless Chromium is needed to check the book: install Debian's chromium and "
            "chromium-driver (tools/sysdeps.sh does)"
        )
    html_dir = Path(html_dir).resolve()
    pages = toc_pages(toc)
    wanted = {(html_dir / p).resolve().as_uri() for p in pages}
    if screenshots is not None:
        screenshots = Path(screenshots)
        screenshots.mkdir(parents=True, exist_ok=True)
    checks = []
    with tempfile.TemporaryDirectory(prefix="qlib-chromium-") as profile_dir:
        browser = _driver(*found, profile_dir)
        try:
            browser.set_script_timeout(timeout)
            browser.set_page_load_timeout(timeout)
            for page in pages:
                checks.append(_check_page(browser, html_dir, page, wanted, screenshots))
        finally:
            browser.quit()
    return checks


def _check_page(browser, html_dir: Path, page: str, wanted: set[str], screenshots) -> PageCheck:
    path = html_dir / page
    if not path.is_file():
        return PageCheck(page, (f"{path} was not built",), 0, 0, None)
    browser.get(path.as_uri())
    seen = browser.execute_async_script(_INSPECT)
    if "error" in seen:
        return PageCheck(page, (f"inspecting the page failed: {seen['error']}",), 0, 0, None)
    problems = []
    if seen["formulas"] and not seen["mathjax"]:  # Sphinx loads MathJax only where there is math
        problems.append("MathJax did not load")
    if seen["untypeset"] or seen["raw"]:
        problems.append(
            f"math not typeset: {seen['untypeset']} formulas left as TeX, raw delimiters "
            f"{seen['raw']} in the text"
        )
    if seen["broken"]:
        problems.append(f"images not loaded: {seen['broken']}")
    if seen["overflowing"]:
        problems.append(f"{seen['overflowing']} outputs run off the right edge")
    if seen["tracebacks"]:
        problems.append(f"{seen['tracebacks']} output cells show a traceback")
    listed = {u.split("#")[0] for u in seen["sidebar"]}
    missing = sorted(u.removeprefix(html_dir.as_uri() + "/") for u in wanted - listed)
    # The root page may be linked as the logo/title rather than in the chapter list.
    missing = [m for m in missing if (html_dir / m).resolve().as_uri() != path.resolve().as_uri()]
    if missing:
        problems.append(f"sidebar lacks {missing}")
    if seen["fetched"] or seen["remote"]:
        problems.append(
            f"reaches outside the book: {sorted(set(seen['fetched'] + seen['remote']))}"
        )
    errors = [e["message"] for e in browser.get_log("browser") if e.get("source") == "javascript"]
    if errors:
        problems.append(f"script errors: {errors}")
    shot = None
    if screenshots is not None:
        shot = screenshots / (page.replace("/", "_").removesuffix(".html") + ".png")
        browser.save_screenshot(str(shot))
    return PageCheck(page, tuple(problems), seen["math"], seen["images"], shot)
