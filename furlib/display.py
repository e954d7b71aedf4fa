"""Showing a figure in a notebook: the one helper every stage's figures go through."""

from pathlib import Path


def show(fig, save_to: str | Path | None = None, dpi: int = 110):
    """Save ``fig`` (if ``save_to``: a .png path, parent folders created), display it once, free it.

    Closing matters: matplotlib's inline backend would show a figure left open a second time at
    the end of the cell, and a long run keeps every open figure in memory.
    """
    import matplotlib.pyplot as plt
    from IPython.display import display

    if save_to is not None:
        save_to = Path(save_to)
        save_to.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=dpi, bbox_inches="tight")
    display(fig)
    plt.close(fig)
    return save_to
