# Jupyter Lab settings for `make lab` (passed with --config; your own config still applies).
# The notebooks under notebooks/ are committed without outputs (a test checks it), and Colab
# opens those files: saving them here keeps the code and drops the outputs, so running a
# notebook leaves `git status` clean. To keep an executed copy, use File > Save Notebook As
# into outputs/<run_name>/, or run the stages with `make run` (executed notebooks land there).
# Jupyter may warn "Overriding existing pre_save_hook" with this same hook: harmless (the
# jupytext extension applies the config a second time).
import os


def strip_outputs_of_committed_notebooks(model, path, contents_manager=None, **kwargs):
    """pre_save_hook: clear outputs and counts of notebooks/NN_verb.ipynb before writing."""
    folder, name = os.path.split(path.strip("/"))
    if model.get("type") != "notebook" or folder != "notebooks" or not name.endswith(".ipynb"):
        return
    for cell in model["content"]["cells"]:
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None


c = get_config()  # noqa: F821 (traitlets provides it when it loads this file)
c.ContentsManager.pre_save_hook = strip_outputs_of_committed_notebooks
