"""What a job shows and leaves behind: progress with an ETA while it runs (`Progress`, the one way every long
loop reports), and tables and plots, CSV for programs, Markdown and PNG for people (`save_table`,
`save_figure`)."""

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from distmeta.io import atomic_path, write_text


class Progress:
    """A loop of `total` steps (epochs, outer steps, episodes, files), with its elapsed time and ETA.

        progress = Progress("meta step", 150, log=print)
        progress.update(step, "outer loss 0.41")         # steps done so far, and what to show beside them

    In a terminal (`log` is `print` and stderr is one, or `bar`) tqdm draws its bar on stderr and no lines
    are written; elsewhere (job logs, Ray workers, pipes) each `update` puts one line through `log`:
    "<what> <n>/<total>: <details>, <elapsed> elapsed, ETA <remaining>" (tqdm's time format), the ETA from
    the steps done since `start`. `log=None` is silent. Loops that report every few steps call `update`
    only then.
    """

    def __init__(self, what: str, total: int, log=print, start: int = 0, bar: bool | None = None):
        self.what, self.total, self.log, self.start = what, total, log, start
        terminal = (log is print and sys.stderr.isatty()) if bar is None else bar
        self.bar = tqdm(total=total, initial=start, desc=what, file=sys.stderr, leave=False,
                        dynamic_ncols=True) if terminal and log is not None else None
        self.started = time.time()

    def update(self, done: int, details: str = "") -> None:
        if self.log is None:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(details)
            if done >= self.total:
                self.bar.close()
            return
        elapsed = time.time() - self.started
        remaining = elapsed / max(done - self.start, 1) * (self.total - done)
        shown = f": {details}" if details else ""
        self.log(f"{self.what} {done}/{self.total}{shown}, {tqdm.format_interval(elapsed)} elapsed, "
                 f"ETA {tqdm.format_interval(remaining)}")


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


def _mlflow_run():
    """The mlflow module when this thread has an active MLflow run (a job's), else None; never imports it."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


def save_table(df: pd.DataFrame, out_dir, name: str, title: str = "", floatfmt: str = ".1f") -> Path:
    """Write `name.csv` and `name.md` under `out_dir`, and inside a job's MLflow run log it with `log_table`
    (`tables/<name>.json`, which the UI shows as a table); returns the Markdown path."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / f"{name}.csv") as tmp:
        df.to_csv(tmp)
    md = out_dir / f"{name}.md"
    write_text(md, (f"## {title}\n\n" if title else "") + markdown_table(df, floatfmt))
    mlflow = _mlflow_run()
    if mlflow is not None:
        flat = df.reset_index()
        flat.columns = [" ".join(map(str, c)).strip() if isinstance(c, tuple) else str(c) for c in flat.columns]
        mlflow.log_table(flat, artifact_file=f"tables/{name}.json")
    return md


def figure(*args, **kwargs):
    """`plt.subplots(*args, **kwargs)` on the file-only backend (jobs run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path) -> Path:
    """Write `fig` as PNG atomically (inside a job's MLflow run also `log_figure`, `plots/<name>.png`) and
    close it: the one way every plot is saved."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    mlflow = _mlflow_run()
    if mlflow is not None:
        mlflow.log_figure(fig, f"plots/{Path(path).name}")
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
