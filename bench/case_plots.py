"""What the single-case benchmarks (bench.asft, bench.token_logprobs) report alike: each record's verdict and
table cells, the time-and-memory plot (one column per group of records, forward+backward time above, peak
memory below, one line per provider) and the report files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence


def verdict(rec: dict) -> str:
    """A record's check against its reference: "ok", "MISMATCH", or "unchecked"."""
    ok = (rec.get("check") or {}).get("ok")
    return "unchecked" if ok is None else "ok" if ok else "MISMATCH"


def record_cells(rec: dict, error_keys: Sequence[str]) -> tuple[str, str, str, str]:
    """(ms median, peak MB, the check's errors at ``error_keys`` joined by " / ", status) of a record, as the
    Markdown tables show them ("-" where not measured; a skipped or failed record's reason as its status)."""
    check = rec.get("check") or {}
    errs = " / ".join(f"{check[k]:.1e}" for k in error_keys if k in check) or "-"
    if rec["status"] == "ok":
        return f"{rec['ms_median']:.2f}", f"{rec.get('peak_mb', math.nan):.1f}", errs, verdict(rec)
    return "-", "-", errs, f"{rec['status']}: {rec.get('reason', '')}".replace("|", "/")


def plot_time_and_memory(data: dict, path: Path, providers: Sequence[str], group_keys: Sequence[str],
                         title: Callable[[tuple], str], suptitle: str) -> Path | None:
    """The plot of ``data``'s ok forward+backward records, one column per distinct ``group_keys`` values
    (``title`` names it), written to ``path``; None without such a record or without matplotlib (e.g. verl's
    venv, where the verl providers run)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["records"] if r["status"] == "ok" and r.get("mode", "forward+backward") == "forward+backward"]
    if not ok:
        return None
    groups = sorted({tuple(r[k] for k in group_keys) for r in ok})
    fig, axes = plt.subplots(2, len(groups), figsize=(max(7.0, 5.0 * len(groups)), 7.5), squeeze=False)
    for col, group in enumerate(groups):
        for name in providers:
            rs = sorted((r for r in ok if tuple(r[k] for k in group_keys) == group and r["provider"] == name),
                        key=lambda r: r["tokens"])
            if not rs:
                continue
            x = [r["tokens"] for r in rs]
            axes[0][col].plot(x, [r["ms_median"] for r in rs], "o-", label=name)
            if all("peak_mb" in r for r in rs):
                axes[1][col].plot(x, [r["peak_mb"] for r in rs], "o-", label=name)
        axes[0][col].set_title(title(group))
        axes[0][col].set_ylabel("forward+backward ms")
        axes[1][col].set_ylabel("peak memory over inputs, MB")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels))
    note = "\nCPU: dft-ops ran its PyTorch backend" if data.get("device_kind") == "cpu" else ""
    fig.suptitle(f"{suptitle} on {data['device']}{note}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(out: Path, stem: str, data: dict, markdown: Callable, plot: Callable,
                  plots: bool = True) -> list[Path]:
    """``<stem>.md`` (``markdown(data, png)``) and, with ``plots``, ``<stem>-fwd-bwd.png`` (``plot(data, path)``)
    from the merged results."""
    png = out / f"{stem}-fwd-bwd.png"
    png = plot(data, png) if plots else (png if png.exists() else None)
    (out / f"{stem}.md").write_text(markdown(data, png))
    return [out / f"{stem}.md"] + ([png] if png is not None else [])
