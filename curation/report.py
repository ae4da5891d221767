"""PNG grids for the curation report: kept and removed examples, duplicate groups."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def image_grid_png(rows: Sequence[Sequence[np.ndarray]], row_titles: Sequence[str] | None = None,
                   cell_inches: float = 1.0) -> bytes:
    """A PNG of images ``(3, S, S)`` uint8 laid out one list per row (ragged rows allowed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = max(1, len(rows))
    n_cols = max([1, *(len(r) for r in rows)])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows + 0.3),
                             squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if r < len(rows) and c < len(rows[r]):
                ax.imshow(np.asarray(rows[r][c]).transpose(1, 2, 0))
        if row_titles and r < len(row_titles):
            axes[r][0].set_title(row_titles[r], fontsize=6, loc="left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()
