"""Executes the book's notebooks with papermill under a parameter profile.

The notebooks that ``_toc.yml`` lists as ``book/nb/<stem>`` are executed from
``notebooks/<stem>.ipynb`` with the parameters of ``book/profiles.yml`` (profile ``full`` for
the book, ``quick`` for tests). A notebook whose source, parameters, ``qlib`` sources and the
benchmark scripts it names are unchanged since its last successful run is not executed again.
A failing notebook is reported with its cell, the others still run, and the run fails at the end.

Command line: ``python -m qlib.book run [--profile quick] [--force] [STEM ...]`` executes;
``python -m qlib.book pdf`` builds the PDF book (after ``run``) and says which chapters could not
go to it; ``python -m qlib.book check [_build/html]`` reads the HTML book in headless Chromium.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import yaml

__all__ = [
    "EXECUTED_DIR",
    "PROFILES",
    "ROOT",
    "Outcome",
    "build_html",
    "execute",
    "hide_injected_parameters",
    "machine",
    "main",
    "profile_parameters",
    "recorded",
    "stage_book",
    "status_outcomes",
    "toc_notebooks",
    "write_status",
]


ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("full", "quick")
EXECUTED_DIR = "book/nb"


@dataclass(frozen=True)
class Outcome:
    """What happened to one notebook."""

    stem: str
    status: str  # "executed", "up to date", "failed"; or, read back, "not executed"
    seconds: float
    error: str = ""
    finished: str = ""  # when the notebook's last execution ended, "YYYY-MM-DD HH:MM UTC"


def toc_notebooks(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """Stems of the executed notebooks that ``_toc.yml`` lists, in book order."""
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            f = node.get("file") or node.get("root")
            if isinstance(f, str) and f.startswith(EXECUTED_DIR + "/"):
                found.append(f.removeprefix(EXECUTED_DIR + "/").removesuffix(".ipynb"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(toc.read_text()))
    return found


def profile_parameters(
    stem: str, profile: str, path: Path = ROOT / "book" / "profiles.yml"
) -> dict:
    """The papermill parameters of notebook ``stem`` under ``profile``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    profiles = yaml.safe_load(path.read_text()) or {}
    if stem not in profiles:
        raise KeyError(f"{path}: no entry for notebook {stem!r}")
    entry = profiles[stem] or {}
    if profile not in entry:
        raise KeyError(f"{path}: notebook {stem!r} has no {profile!r} profile")
    return {"profile": profile, **(entry[profile] or {})}


def _key(source: Path, parameters: dict) -> str:
    h = hashlib.sha256()
    h.update(source.read_bytes())
    h.update(json.dumps(parameters, sort_keys=True).encode())
    for f in sorted((ROOT / "qlib").rglob("*.py")):
        h.update(f.read_bytes())
    # The hardware chapter simulates and synthesises the Verilog sources.
    for f in sorted((ROOT / "hdl").rglob("*.v*")):
        h.update(f.read_bytes())
    # A notebook that names a benchmark script (the performance chapter runs them) depends on it.
    text = source.read_text()
    for f in sorted((ROOT / "benchmarks").glob("*.py")):
        if f.name in text:
            h.update(f.read_bytes())
    return h.hexdigest()


def execute(
    stem: str,
    profile: str,
    *,
    out_dir: Path = ROOT / EXECUTED_DIR,
    force: bool = False,
    notebooks_dir: Path = ROOT / "notebooks",
    profiles: Path = ROOT / "book" / "profiles.yml",
) -> Outcome:
    """Execute ``notebooks/<stem>.ipynb`` into ``out_dir`` under ``profile``."""
    import papermill

    source = Path(notebooks_dir) / f"{stem}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"_toc.yml lists {EXECUTED_DIR}/{stem} but {source} does not exist")
    parameters = profile_parameters(stem, profile, profiles)
    target = Path(out_dir) / f"{stem}.ipynb"
    key = _key(source, parameters)
    if not force and target.is_file():
        meta = json.loads(target.read_text()).get("metadata", {}).get("qlib", {})
        if meta.get("key") == key and meta.get("ok"):
            return Outcome(
                stem, "up to date", meta.get("seconds", 0.0), "", meta.get("finished", "")
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    error = ""
    try:
        papermill.execute_notebook(
            str(source),
            str(target),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(notebooks_dir),
            progress_bar=False,
        )
    except papermill.PapermillExecutionError as e:
        error = f"cell {e.cell_index} (execution count {e.exec_count}): {e.ename}: {e.evalue}"
    seconds = time.perf_counter() - start
    if target.is_file():
        nb = json.loads(target.read_text())
        hide_injected_parameters(nb)
        from qlib import bookpdf  # here: bookpdf builds on this module

        bookpdf.tables_to_markdown(nb)  # the PDF's form of each HTML table
        finished = _now()
        nb.setdefault("metadata", {})["qlib"] = {
            "key": key,
            "ok": not error,
            "seconds": seconds,
            "profile": profile,
            "finished": finished,
            "error": error,
        }
        target.write_text(json.dumps(nb, indent=1))
    else:
        finished = _now()
    return Outcome(stem, "failed" if error else "executed", seconds, error, finished)


def recorded(stem: str, nb_dir: Path = ROOT / EXECUTED_DIR) -> Outcome:
    """What ``nb_dir/<stem>.ipynb`` records of its last execution (status "not executed" if
    there is no executed notebook)."""
    target = Path(nb_dir) / f"{stem}.ipynb"
    meta = {}
    if target.is_file():
        meta = json.loads(target.read_text()).get("metadata", {}).get("qlib", {})
    if not meta:
        return Outcome(stem, "not executed", 0.0)
    status = "executed" if meta.get("ok") else "failed"
    return Outcome(
        stem,
        status,
        float(meta.get("seconds", 0.0)),
        meta.get("error", ""),
        meta.get("finished", ""),
    )


def hide_injected_parameters(nb: dict) -> int:
    """Tag papermill's ``injected-parameters`` cells ``remove-cell``; return how many.

    The cell stays in the executed notebook (it records the run's parameters) but the rendered
    book drops it: the reader sees the notebook's own ``parameters`` cell, and the profile's
    values in the build-status page.
    """
    n = 0
    for cell in nb.get("cells", []):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags:
            n += 1
            if "remove-cell" not in tags:
                tags.append("remove-cell")
    return n


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine() -> str:
    """A one-line description of this machine (CPU model and cores)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def write_status(
    outcomes: list[Outcome], profile: str, path: Path, wall_seconds: float | None = None
) -> Path:
    """Write the build-status table to ``path`` (Markdown, included by the status page) and the
    build's total to ``build_total.md`` beside it (included by the intro); return the latter.

    ``outcomes`` should cover every chapter (``recorded`` reads back those not run now);
    ``wall_seconds`` is the wall time of the run that wrote it.
    """
    total = sum(o.seconds for o in outcomes)
    lines = [
        f"Profile `{profile}`; notebooks executed on {machine()}, Python "
        f"{platform.python_version()}; total notebook time {total / 60:.1f} min "
        f"(time of each notebook's last execution).",
        "",
        "| notebook | status | time (s) | finished |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {o.stem} | {o.status} | {o.seconds:.1f} | {o.finished or '-'} |" for o in outcomes
    ]
    problems = [o for o in outcomes if o.status.startswith("failed") or o.status == "not executed"]
    if problems:
        lines += ["", "Failed or not executed:"]
        lines += [f"- {o.stem}: {o.status}{': ' + o.error if o.error else ''}" for o in problems]
    pkgs = ["torch", "numpy", "scipy", "scikit-learn", "papermill", "jupyter-book", "matplotlib"]
    versions = []
    for p in pkgs:
        try:
            versions.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    lines += ["", "Packages: " + ", ".join(versions) + "."]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")

    ran = [o for o in outcomes if o.status in ("executed", "failed")]
    total_md = path.with_name("build_total.md")
    text = [
        f"Executing every chapter once takes **{total / 60:.1f} min** on {machine()} "
        f"(profile `{profile}`, the sum of each chapter's last execution time)."
    ]
    if wall_seconds is not None:
        text.append(
            f"The last run of the notebooks (`python -m qlib.book run`, finished {_now()}) took "
            f"**{wall_seconds / 60:.1f} min** of wall time and executed {len(ran)} of the "
            f"{len(outcomes)} chapters (the others were up to date, or not asked for)."
        )
    if problems:
        text.append(
            f"Failed or not executed in this build: {', '.join(o.stem for o in problems)} "
            "(see the status page)."
        )
    text.append("Per-chapter times are on the {doc}`build status </book/status>` page.")
    total_md.write_text(" ".join(text) + "\n")
    return total_md


def status_outcomes(
    outcomes: list[Outcome], stems: list[str], nb_dir: Path = ROOT / EXECUTED_DIR
) -> list[Outcome]:
    """``outcomes`` of this run, completed with what ``nb_dir`` records for the other ``stems``
    (status suffixed "(earlier run)"), in the order of ``stems``."""
    by_stem = {o.stem: o for o in outcomes}
    done = []
    for stem in stems:
        o = by_stem.get(stem) or recorded(stem, nb_dir)
        if stem not in by_stem and o.status != "not executed":
            o = replace(o, status=f"{o.status} (earlier run)")
        done.append(o)
    return done


def stage_book(nb_dir: Path, dest: Path, profile: str = "quick") -> Path:
    """Lay out a buildable copy of the book in ``dest``: the configuration and pages of this
    repository with the executed notebooks of ``nb_dir`` as ``book/nb``, and a status page read
    back from them. Returns ``dest``; nothing is executed.

    Used to build the HTML of notebooks executed elsewhere (the tests execute into a temporary
    folder) without touching ``book/nb`` or ``_build``.
    """
    dest = Path(dest)
    for name in ("_config.yml", "_toc.yml"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "book",
        dest / "book",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("nb", "_generated", "_build"),
    )
    stems = toc_notebooks(dest / "_toc.yml")
    (dest / EXECUTED_DIR).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        src = Path(nb_dir) / f"{stem}.ipynb"
        if src.is_file():
            shutil.copy2(src, dest / EXECUTED_DIR / f"{stem}.ipynb")
    outcomes = [recorded(stem, Path(nb_dir)) for stem in stems]
    write_status(outcomes, profile, dest / "book" / "_generated" / "status.md")
    return dest


def _jupyter_book(source: Path, builder: str, out: Path | None, log: Path) -> int:
    """Run ``jupyter-book build`` with its output in ``log``; return its exit status."""
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe if exe.exists() else "jupyter-book"), "build", str(source), "--builder", builder]
    if out is not None:
        cmd += ["--path-output", str(out)]
    log.parent.mkdir(parents=True, exist_ok=True)
    # LaTeX goes on past an error (reported by chapter afterwards) instead of waiting for input;
    # latexmk -f finishes the passes so that the PDF's references resolve all the same.
    env = {**os.environ, "LATEXOPTS": "-interaction=nonstopmode", "LATEXMKOPTS": "-f"}
    with log.open("w") as f:
        return subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, check=False
        ).returncode


def build_html(source: Path = ROOT, out: Path | None = None) -> Path:
    """Build the HTML book of ``source`` (a book root) with Jupyter Book; return the folder
    holding ``index.html`` (``<out or source>/_build/html``). Raises ``RuntimeError`` with the
    end of the build log if the build fails."""
    base = Path(out or source)
    log = base / "_build" / "html-build.log"
    if _jupyter_book(Path(source), "html", out, log) != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"jupyter-book HTML build of {source} failed (log {log}):\n{tail}")
    return base / "_build" / "html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlib.book", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks of _toc.yml with papermill")
    run.add_argument("stems", nargs="*", help="notebook stems (default: all of _toc.yml)")
    run.add_argument("--profile", default="full", choices=PROFILES)
    run.add_argument("--force", action="store_true", help="execute even if up to date")
    pdf = sub.add_parser("pdf", help="build the PDF book with LaTeX; copy it into the HTML book")
    pdf.add_argument("--html", type=Path, default=None, help="HTML book folder (_build/html)")
    check = sub.add_parser("check", help="read the built HTML book in headless Chromium")
    check.add_argument("html", nargs="?", type=Path, default=ROOT / "_build" / "html")
    check.add_argument("--screenshots", type=Path, default=ROOT / "_build" / "screenshots")
    args = parser.parse_args(argv)
    if args.command == "pdf":
        from qlib import bookpdf

        return 0 if bookpdf.build_pdf(html_dir=args.html) else 1
    if args.command == "check":
        return _check(args.html, args.screenshots)

    start = time.perf_counter()
    stems = args.stems or toc_notebooks()
    outcomes = []
    for stem in stems:
        print(f"[qlib.book] {stem} ({args.profile}) ...", flush=True)
        o = execute(stem, args.profile, force=args.force)
        print(f"[qlib.book] {stem}: {o.status} in {o.seconds:.1f} s {o.error}", flush=True)
        outcomes.append(o)
    write_status(
        status_outcomes(outcomes, toc_notebooks()),
        args.profile,
        ROOT / "book" / "_generated" / "status.md",
        wall_seconds=time.perf_counter() - start,
    )
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        print(f"[qlib.book] FAILED notebooks/{o.stem}.ipynb at {o.error}", file=sys.stderr)
    return 1 if failed else 0


def _check(html: Path, screenshots: Path) -> int:
    from qlib import bookcheck

    checks = bookcheck.check_book(html, ROOT / "_toc.yml", screenshots)
    for c in checks:
        state = "ok" if not c.problems else "; ".join(c.problems)
        print(f"[qlib.book check] {c.page}: {c.math} formulas, {c.images} images: {state}")
    print(f"[qlib.book check] screenshots in {screenshots}")
    return 1 if any(c.problems for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
