# Jupyter Lab settings for `make lab` (passed with --config; your own config still applies).
# The notebooks under notebooks/ are committed without outputs (a test checks it), and Colab
# opens those files: saving them here keeps the code and drops the outputs, so running a
# notebook leaves `git status` clean. To keep an executed copy, use File > Save Notebook As
# into outputs/<run_name>/, or run the stages with `make run` (executed notebooks land there).
# Jupyter may warn "Overriding existing pre_save_hook" with this same hook: harmless (the
# jupytext extension applies the config a second time).
import os

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def strip_outputs_of_committed_notebooks(model, path, contents_manager=None, **kwargs):
    """pre_save_hook: clear outputs and counts of notebooks/NN_verb.ipynb before writing.

    ``path`` is relative to the server's root (``contents_manager.root_dir``): `make lab` opens a
    notebook, which makes ``notebooks/`` the root and the path just ``01_data_prep.ipynb``; so the
    file is found from its absolute location, whatever the root."""
    root = getattr(contents_manager, "root_dir", None) or os.getcwd()
    where = os.path.realpath(os.path.join(root, path.strip("/")))
    if model.get("type") != "notebook" or os.path.dirname(where) != os.path.realpath(NOTEBOOKS) \
            or not where.endswith(".ipynb"):
        return
    for cell in model["content"]["cells"]:
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None


c = get_config()  # noqa: F821 (traitlets provides it when it loads this file)
c.ContentsManager.pre_save_hook = strip_outputs_of_committed_notebooks
