"""Writing matplotlib figures: one helper shared by the run report and the method plots."""
from __future__ import annotations

import os


def save_png(fig, out_path: str) -> str:
    """Lay out, write atomically (temporary name, then rename), and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
