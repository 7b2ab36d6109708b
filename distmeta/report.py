"""Tables and plots a job leaves behind: CSV for programs, Markdown and PNG for people (the one way
every job saves a table, `save_table`, and a figure, `save_figure`)."""

from pathlib import Path

import numpy as np
import pandas as pd

from distmeta.io import atomic_path, write_text


def say(name: str, line: str) -> None:
    """Print `line` under `name`: trainings side by side (threads or Ray Train runs) interleave their lines."""
    print(f"{name}: {line}", flush=True)


def markdown_table(df: pd.DataFrame, floatfmt: str = ".1f") -> str:
    header = [str(df.index.name or "")] + [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in zip(df.index, df.itertuples(index=False)):  # itertuples keeps each column's dtype
        cells = [format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v) for v in row]
        lines.append("| " + " | ".join([str(index), *cells]) + " |")
    return "\n".join(lines) + "\n"


def save_table(df: pd.DataFrame, out_dir, name: str, title: str = "", floatfmt: str = ".1f") -> Path:
    """Write `name.csv` and `name.md` under `out_dir`; returns the Markdown path."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / f"{name}.csv") as tmp:
        df.to_csv(tmp)
    md = out_dir / f"{name}.md"
    write_text(md, (f"## {title}\n\n" if title else "") + markdown_table(df, floatfmt))
    return md


def figure(*args, **kwargs):
    """`plt.subplots(*args, **kwargs)` on the file-only backend (jobs run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path) -> Path:
    """Write `fig` as PNG atomically and close it: the one way every plot is saved."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def save_heatmap(df: pd.DataFrame, path, title: str, fmt: str = ".1f") -> Path:
    fig, ax = figure(figsize=(1.0 + 0.8 * len(df.columns), 0.6 + 0.45 * len(df.index)))
    image = ax.imshow(df.to_numpy(float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(df.columns)), [str(c) for c in df.columns], rotation=45, ha="right")
    ax.set_yticks(range(len(df.index)), [str(i) for i in df.index])
    for (i, j), value in pd.DataFrame(df.to_numpy(float)).stack().items():
        ax.text(j, i, format(value, fmt), ha="center", va="center", color="w", fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)
