"""A small mutation run: does the suite catch the recipe's plausible one-line bugs?

Each entry of ``tools/mutations/edits.yaml`` is one plausible edit (file, exact old text, new
text, why someone could write it). For each, this script copies the working tree (tracked and
untracked, not ignored files: uncommitted changes count) into a temporary folder, applies the
edit there -- never to the tree itself --, runs the recipe's fast tests on the copy and records
whether they failed ("caught") or passed ("MISSED"). The table goes to ``tools/mutations/RESULTS.md``.

Not part of ``make test``: with -x a caught edit usually stops within seconds, but a missed one
runs the whole fast set (~70 s on two busy cores). ``tests/test_mutation_list.py`` (fast, in
the suite) only checks that every edit still applies to the code.

    python tools/mutations/run.py                      # all edits, table -> tools/mutations/RESULTS.md
    python tools/mutations/run.py --only gen_sign,ema_swapped --table /tmp/t.md
"""

import argparse
import datetime
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EDITS = HERE / "edits.yaml"
# the recipe's fast tests, quickest checks first so that -x stops early
FAST_TESTS = ["tests/test_directions.py", "tests/test_oklab.py", "tests/test_critic.py", "tests/test_recipe.py",
              "tests/test_train.py", "tests/test_fp16.py",
              "--deselect", "tests/test_train.py::test_compiled_fast_path_matches_plain"]  # minutes of compiling
FIELDS = ("id", "file", "old", "new", "why")


def load_edits(path: Path = EDITS) -> list[dict]:
    """The edit list, each entry checked for its fields (a missing one names the entry)."""
    edits = yaml.safe_load(path.read_text())
    for i, e in enumerate(edits):
        missing = [f for f in FIELDS if not e.get(f)]
        if missing:
            raise ValueError(f"{path}: entry {i} ({e.get('id', '?')}) lacks {missing}")
    ids = [e["id"] for e in edits]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return edits


def mutated_text(root: Path, edit: dict) -> str:
    """The edited file's text; the old text must occur exactly once (else the list is stale)."""
    path = root / edit["file"]
    if not path.is_file():
        raise ValueError(f"edit {edit['id']}: no file {edit['file']} (moved? update tools/mutations/edits.yaml)")
    text = path.read_text()
    count = text.count(edit["old"])
    if count != 1:
        raise ValueError(f"edit {edit['id']}: its old text occurs {count} times in {edit['file']}, "
                         "not once: update tools/mutations/edits.yaml to the current code")
    return text.replace(edit["old"], edit["new"])


def copy_tree(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree, as they are now."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(tree: Path, tests: list, timeout: int) -> tuple[str, str, float]:
    """(outcome, first failing test, seconds) of the fast tests on ``tree``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        done = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.time() - t0
    seconds = time.time() - t0
    if done.returncode == 0:
        return "MISSED", "", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    if done.returncode == 1 and failed:
        return "caught", failed[0], seconds
    return f"error (pytest exit {done.returncode})", (failed or [done.stdout.strip()[-200:]])[0], seconds


def _env(tree: Path) -> dict:
    import os

    return dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")


def mutate_one(edit: dict, tests: list, timeout: int) -> dict:
    """Apply ``edit`` to a fresh copy of the tree and run the tests there."""
    with tempfile.TemporaryDirectory(prefix="furlib-mutant-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        text = mutated_text(tree, edit)
        compile(text, edit["file"], "exec")  # an edit that does not parse would be "caught" by any test
        (tree / edit["file"]).write_text(text)
        outcome, first, seconds = run_tests(tree, edit.get("tests", tests), timeout)
    return dict(edit, outcome=outcome, first_failure=first, seconds=round(seconds, 1))


def table(results: list[dict], baseline_s: float, tests: list) -> str:
    caught = sum(r["outcome"] == "caught" for r in results)
    head = (f"# Mutation run\n\n{datetime.date.today()}, commit `{_commit()}`: the fast recipe tests "
            f"(`{' '.join(tests)}`, {baseline_s:.0f} s unmutated) catch **{caught} of {len(results)}** "
            "plausible one-line edits. Repeat: `PYTHONPATH=$PWD python tools/mutations/run.py` "
            "(edits in `tools/mutations/edits.yaml`).\n\n"
            "| id | file | edit (old → new) | why plausible | result | first failing test | s |\n"
            "|---|---|---|---|---|---|---|\n")
    esc = lambda s: " ".join(str(s).split()).replace("|", "\\|")  # noqa: E731
    rows = [f"| {r['id']} | `{r['file']}` | `{esc(r['old'])}` → `{esc(r['new'])}` | {esc(r['why'])} | "
            f"{r['outcome']} | {esc(r['first_failure'].split('::')[-1])} | {r['seconds']} |" for r in results]
    return head + "\n".join(rows) + "\n"


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return out.stdout.strip() + (" + uncommitted changes" if dirty.strip() else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated edit ids (default: all)")
    ap.add_argument("--table", default=str(HERE / "RESULTS.md"), help="where the markdown table goes")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    ap.add_argument("--tests", default="", help="pytest arguments for every edit instead of the fast set and "
                    "the edits' own (e.g. to see what a smaller suite catches)")
    a = ap.parse_args(argv)
    tests = a.tests.split() if a.tests else FAST_TESTS
    edits = load_edits()
    if a.only:
        wanted = a.only.split(",")
        unknown = sorted(set(wanted) - {e["id"] for e in edits})
        if unknown:
            raise SystemExit(f"--only: no edit(s) {unknown} in {EDITS}")
        edits = [e for e in edits if e["id"] in wanted]
    for e in edits:  # a stale entry fails before any test runs
        mutated_text(ROOT, e)
    with tempfile.TemporaryDirectory(prefix="furlib-unmutated-") as tmp:
        copy_tree(Path(tmp))
        outcome, first, baseline_s = run_tests(Path(tmp), tests, a.timeout)
    if outcome != "MISSED":  # "MISSED" = the tests passed
        raise SystemExit(f"the unmutated tree fails its tests ({outcome}: {first}); fix that first")
    print(f"unmutated: tests pass in {baseline_s:.0f} s", flush=True)
    results = []
    for e in edits:
        results.append(mutate_one(dict(e, tests=tests) if a.tests else e, tests, a.timeout))
        r = results[-1]
        print(f"{r['id']:<28} {r['outcome']:<8} {r['seconds']:>6} s  {r['first_failure']}", flush=True)
    Path(a.table).write_text(table(results, baseline_s, tests))
    missed = [r["id"] for r in results if r["outcome"] != "caught"]
    print(f"caught {len(results) - len(missed)} of {len(results)}" + (f"; not caught: {missed}" if missed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
