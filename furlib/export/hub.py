"""The export folder as the Hub gets it: the manifest's file table that vouches for it, the check
that ``export/`` holds only what 04 wrote, the repository id check and the upload.

Paths in the table are relative to the export folder, POSIX style; hashes are SHA-256 hex.
Desktop junk (``DESKTOP_JUNK``) is neither listed as foreign nor uploaded.
"""

import json
import os
from pathlib import Path

from furlib.atomic import recover_folder
from furlib.runinfo import check_folders, file_sha256


def hub_repo_problem(repo_id: str) -> str:
    """'' if ``repo_id`` is a repository id the Hub accepts; else why not (before any training:
    the Hub's own check ran only at the upload, after the training and the export)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") == 1:
            return ""
    except HFValidationError:
        pass
    return (f"hub_repo must be 'owner/name' (letters, digits, '-', '_' and '.', neither part starting or "
            f"ending with '-' or '.'), got {repo_id!r}")


def file_table(root: Path) -> list[dict]:
    """Every file under ``root`` but the manifest: relative path, size in bytes, SHA-256."""
    root = Path(root)
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"]


DESKTOP_JUNK = {".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints"}  # replaced with export/
_JUNK_PATTERNS = [p for j in sorted(DESKTOP_JUNK) for p in (j, f"*/{j}", f"{j}/*", f"*/{j}/*")]  # never uploaded


def manifest_differences(export_dir: Path) -> tuple[list, list]:
    """(files added or edited since ``manifest.json`` listed them, files it lists that are gone);
    desktop junk is neither, a clone's ``.git/`` is added."""
    try:
        listed = {f["path"]: f["sha256"] for f in json.loads((Path(export_dir) / "manifest.json").read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    found = [f for f in file_table(export_dir) if not set(f["path"].split("/")) & DESKTOP_JUNK]
    return ([f["path"] for f in found if listed.get(f["path"]) != f["sha256"]],
            sorted(set(listed) - {f["path"] for f in found}))


def check_export_is_ours(export_dir: Path) -> None:
    """04 replaces ``export/`` whole: before any work, refuse when it holds what 04 did not write
    (a file a user added or edited since, by its manifest), or is a file, instead of deleting it."""
    export_dir = Path(export_dir)
    if export_dir.is_symlink():  # the swap would replace the link and leave its target stale
        raise ValueError(f"{export_dir} is a link (to {os.readlink(export_dir)}); 04 replaces the folder whole: "
                         "remove the link and copy export/ where you want it after 04, or set outputs_dir there")
    check_folders(export_dir.parent, [export_dir.name])
    if not export_dir.is_dir() or not any(export_dir.iterdir()):
        return
    foreign, _ = manifest_differences(export_dir)
    if foreign:
        raise ValueError(f"{export_dir} holds files 04 did not write, or edited since it did: {foreign[:5]}"
                         f"{' ...' if len(foreign) > 5 else ''}. 04 replaces export/ whole: move them out "
                         "(a card's words belong in 04's training_data and license parameters), then run 04 again")


def push_to_hub(export_dir: Path, repo_id: str, private: bool = False, endpoint: str | None = None) -> str:
    """Upload the verified export folder to ``repo_id`` with the token in ``HF_TOKEN``."""
    if problem := hub_repo_problem(repo_id):
        raise ValueError(problem)
    recover_folder(export_dir)  # a release left aside by a killed 04 is the one to upload
    if not (Path(export_dir) / "manifest.json").exists():
        raise RuntimeError(f"{export_dir} has no manifest.json: only a verified export is uploaded")
    changed, missing = manifest_differences(export_dir)  # the manifest would vouch for files it never saw
    if changed or missing:
        raise RuntimeError(f"{export_dir} is not the export 04 verified (added or edited since: {changed[:5]}, "
                           f"gone: {missing[:5]}); nothing was uploaded. Run 04 again to rebuild and verify it "
                           "(a card's words belong in 04's training_data and license parameters)")
    token = os.environ.get("HF_TOKEN", "")
    if not token:
        raise RuntimeError("push_to_hub needs a Hugging Face write token in the environment "
                           "variable HF_TOKEN (on Colab: a secret named HF_TOKEN)")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, ignore_patterns=_JUNK_PATTERNS,
                          commit_message=f"Upload {Path(export_dir).parent.name} export")
    except Exception as err:  # offline, auth and HTTP errors differ across huggingface_hub versions
        raise RuntimeError(f"upload to the Hugging Face Hub ({repo_id}) failed: {err}. The export in {export_dir} "
                           "is complete and unchanged: upload it again with push_to_hub once the cause is fixed "
                           "(no need to run 04 again)") from err
    return f"https://huggingface.co/{repo_id}"
