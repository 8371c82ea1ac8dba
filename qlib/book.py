"""Executes the book's notebooks with papermill under a parameter profile.

The notebooks that ``_toc.yml`` lists as ``book/nb/<stem>`` are executed from
``notebooks/<stem>.ipynb`` with the parameters of ``book/profiles.yml`` (profile ``full`` for
the book, ``quick`` for tests). A notebook whose source, parameters, ``qlib`` sources and the
benchmark scripts it names are unchanged since its last successful run is not executed again.
A failing notebook is reported with its cell, the others still run, and the run fails at the end.

Command line: ``python -m qlib.book run [--profile quick] [--force] [STEM ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("full", "quick")
EXECUTED_DIR = "book/nb"


@dataclass(frozen=True)
class Outcome:
    """What happened to one notebook."""

    stem: str
    status: str  # "executed", "up to date" or "failed"
    seconds: float
    error: str = ""


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


def profile_parameters(stem: str, profile: str, path: Path = ROOT / "book" / "profiles.yml") -> dict:
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
            return Outcome(stem, "up to date", meta.get("seconds", 0.0))
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
        nb.setdefault("metadata", {})["qlib"] = {
            "key": key, "ok": not error, "seconds": seconds, "profile": profile,
        }
        target.write_text(json.dumps(nb, indent=1))
    return Outcome(stem, "failed" if error else "executed", seconds, error)


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


def write_status(outcomes: list[Outcome], profile: str, path: Path) -> None:
    """A Markdown table of the run (included by the book's intro and status page)."""
    total = sum(o.seconds for o in outcomes)
    lines = [
        f"Profile `{profile}`; notebooks executed on {machine()}, Python "
        f"{platform.python_version()}; total notebook time {total / 60:.1f} min "
        f"(time of each notebook's last execution).",
        "",
        "| notebook | status | time (s) |",
        "|---|---|---|",
    ]
    lines += [f"| {o.stem} | {o.status} | {o.seconds:.1f} |" for o in outcomes]
    pkgs = ["torch", "numpy", "scipy", "scikit-learn", "papermill", "jupyter-book", "matplotlib"]
    versions = []
    for p in pkgs:
        try:
            versions.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    lines += ["", "Packages: " + ", ".join(versions) + "."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlib.book", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks of _toc.yml with papermill")
    run.add_argument("stems", nargs="*", help="notebook stems (default: all of _toc.yml)")
    run.add_argument("--profile", default="full", choices=PROFILES)
    run.add_argument("--force", action="store_true", help="execute even if up to date")
    args = parser.parse_args(argv)

    stems = args.stems or toc_notebooks()
    outcomes = []
    for stem in stems:
        print(f"[qlib.book] {stem} ({args.profile}) ...", flush=True)
        o = execute(stem, args.profile, force=args.force)
        print(f"[qlib.book] {stem}: {o.status} in {o.seconds:.1f} s {o.error}", flush=True)
        outcomes.append(o)
    write_status(outcomes, args.profile, ROOT / "book" / "_generated" / "status.md")
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        print(f"[qlib.book] FAILED notebooks/{o.stem}.ipynb at {o.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
