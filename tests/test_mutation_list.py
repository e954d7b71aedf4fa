"""The mutation run's edit list (tools/mutations/edits.yaml) still applies to the code: each
old text occurs once in its file and the edited file still parses. Fast; the run itself is not
part of the suite (tools/mutations/run.py)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

spec = importlib.util.spec_from_file_location("mutation_run", ROOT / "tools" / "mutations" / "run.py")
mutation_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation_run)
EDITS = mutation_run.load_edits()


def test_the_list_holds_the_issues_three_and_enough_others():
    ids = {e["id"] for e in EDITS}
    assert {"gen_sign", "lpips_01", "ema_swapped"} <= ids and len(ids) >= 20


@pytest.mark.parametrize("edit", EDITS, ids=[e["id"] for e in EDITS])
def test_edit_applies_once_and_parses(edit):
    text = mutation_run.mutated_text(ROOT, edit)
    assert text != (ROOT / edit["file"]).read_text()
    compile(text, edit["file"], "exec")


def test_stale_edit_is_refused_with_its_id(tmp_path):
    (tmp_path / "m.py").write_text("a = 1\n")
    with pytest.raises(ValueError, match="edit stale: its old text occurs 0 times in m.py"):
        mutation_run.mutated_text(tmp_path, {"id": "stale", "file": "m.py", "old": "a = 2", "new": "a = 3"})
