"""Results on disk: ``<device>.json`` (merged across runs), ``<device>.md`` and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .cases import HEADS, MODES
from .providers import PROVIDERS
from .run import MODE_SHORT

KEY_FIELDS = ("provider", "objective", "shape", "hidden", "vocab", "tokens", "dtype", "mode", "inputs")
# tables and plots list providers in the order a run measures them (dft-ops' modes, then the peers)
PROVIDER_ORDER = tuple(PROVIDERS)
CPU_NOTE = ("CPU run: dft-ops runs its PyTorch fallback (backend='torch') here; the Triton modes need a GPU. "
            "Times are CPU times, not the GPU kernels'.")


def record_key(rec: dict) -> tuple:
    return tuple(rec[k] for k in KEY_FIELDS)


def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"records": [], "runs": []}


def merge(path: Path, records: list[dict], run_info: dict) -> dict:
    """Add this run's records to the device's file; a record measured again replaces the old one."""
    data = load(path)
    by_key = {record_key(r): r for r in data["records"]}
    for r in records:
        by_key[record_key(r)] = r
    data["records"] = sorted(by_key.values(), key=_sort_key)
    runs = [r for r in data.get("runs", []) if r.get("started") != run_info.get("started")]
    data["runs"] = runs + [run_info]
    data["device"] = run_info["device"]
    data["device_kind"] = run_info["device_kind"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return data


def _sort_key(r: dict):
    shape_rank = list(HEADS).index(r["shape"]) if r["shape"] in HEADS else len(HEADS)
    prov_rank = PROVIDER_ORDER.index(r["provider"]) if r["provider"] in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return (shape_rank, r["shape"], r["dtype"], r["inputs"], r["objective"], MODES.index(r["mode"]), r["tokens"],
            prov_rank, r.get("workspace_mb") or 0.0)


# --- tables -------------------------------------------------------------------------------------------

def _fmt(x, spec: str, missing: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return missing
    return format(x, spec)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _verdict(rec: dict) -> str:
    c = rec.get("check")
    if not c:
        return ""
    if c.get("reference"):
        return "ref"
    if c.get("ok") is None:
        return "unchecked"
    return "ok" if c["ok"] else "MISMATCH"


def _runs(rec: dict) -> str:
    if "n_runs" not in rec:
        return "-"
    return f"{rec['n_runs']}" + (" (cut)" if rec.get("cut_by_deadline") else "")


def _case_of(r: dict) -> tuple:
    return (r["shape"], r["objective"], r["dtype"], r["inputs"], r["tokens"])


def backward_in_forward(records: list[dict]) -> set[tuple]:
    """(provider, case) pairs whose gradients were formed in the forward: their backward, timed alone, took
    under half their forward's time (a two-pass backward does twice the forward's products). Their "fwd"
    and "bwd" rows are not comparable with the others' (the forward holds the backward's work); "fwd+bwd" is."""
    ms = {(r["provider"], _case_of(r), r["mode"]): r["ms_median"] for r in records
          if r["status"] == "ok" and r.get("ms_median")}
    return {(p, case) for (p, case, mode), t in ms.items()
            if mode == "backward" and (p, case, "forward") in ms and t < 0.5 * ms[(p, case, "forward")]}


BACKWARD_IN_FORWARD_NOTE = ("`*`: the gradients are formed in the forward (the backward, timed alone, took under "
                            "half the forward's time): this provider's fwd and bwd rows are not comparable with "
                            "the others'; compare fwd+bwd.")


def summary_lines(records: list[dict]) -> list[str]:
    """One line per case measured forward+backward: dft-ops as shipped against the fastest peer that ran
    (time ratio, and the ratio of peak memory over the inputs)."""
    ok = [r for r in records if r["status"] == "ok" and r["mode"] == "forward+backward" and r.get("ms_median")]
    lines = []
    for case in sorted({_case_of(r) for r in ok}, key=lambda c: (list(HEADS).index(c[0]) if c[0] in HEADS
                                                                  else len(HEADS), *c)):
        ours = next((r for r in ok if _case_of(r) == case and r["provider"] == "dft-ops"), None)
        peers = [r for r in ok if _case_of(r) == case and not r["provider"].startswith("dft-ops")]
        shape, objective, dtype, inputs, tokens = case
        what = f"{shape} {objective} {dtype} {inputs} {_tokens(tokens)} fwd+bwd"
        if ours is None or not peers:
            lines.append(f"{what}: " + ("no dft-ops result" if ours is None else "no peer ran"))
            continue
        best = min(peers, key=lambda r: r["ms_median"])
        memory = ""
        if ours.get("peak_mb") and best.get("peak_mb"):
            memory = f", memory {ours['peak_mb'] / best['peak_mb']:.2f}x ({ours['peak_mb']:.0f} vs {best['peak_mb']:.0f} MB)"
        lines.append(f"{what}: dft-ops {ours['ms_median']:.1f} ms vs the fastest peer, {best['provider']}, "
                     f"{best['ms_median']:.1f} ms: time {ours['ms_median'] / best['ms_median']:.2f}x{memory}")
    return lines


def result_rows(records: list[dict], cpu: bool) -> tuple[list[str], list[list[str]]]:
    header = ["shape", "objective", "mode", "tokens", "provider", "ms median", "ms min-max", "runs"]
    header += ["CPU ms"] if cpu else []
    header += ["tokens/s", "TFLOP/s", "% GEMM", "peak RSS MB" if cpu else "peak MB", "extra MB", "check", "status"]
    rows = []
    flagged = backward_in_forward(records)
    for r in sorted(records, key=_sort_key):
        ok = r["status"] == "ok"
        mode = MODE_SHORT[r["mode"]]
        if r["mode"] != "forward+backward" and (r["provider"], _case_of(r)) in flagged:
            mode += "*"
        row = [r["shape"], r["objective"], mode, _tokens(r["tokens"]), r["provider"]]
        if ok:
            row += [_fmt(r["ms_median"], ".3f"), f"{r['ms_min']:.3f}-{r['ms_max']:.3f}", _runs(r)]
            row += [_fmt(r.get("cpu_ms_median"), ".2f")] if cpu else []
            frac = r.get("gemm_fraction")
            row += [_fmt(r["tokens_per_s"], ",.0f"), _fmt(r["tflops"], ".2f"),
                    _fmt(None if frac is None else 100 * frac, ".1f"),
                    _fmt(r.get("peak_mb"), ".1f"), _fmt(r.get("extra_mb"), "+.1f"), _verdict(r), "ok"]
        else:
            row += ["-", "-", "-"] + (["-"] if cpu else []) + ["-"] * 5
            row += [_verdict(r), r["status"].upper() + (f": {r['reason']}" if r.get("reason") else "")]
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]], max_status: int = 60) -> str:
    rows = [row[:-1] + [row[-1][:max_status]] for row in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def check_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per provider x case x reference (the checks are per case, not per mode): against the float64
    reference (``check``), then against dft-ops (``agreement``)."""
    header = ["shape", "tokens", "objective", "dtype", "inputs", "provider", "against", "loss rel err",
              "d(hidden) rel err", "d(weight) rel err", "tolerance (loss / grads)", "verdict"]
    seen, rows = set(), []
    for r in sorted(records, key=_sort_key):
        for field_name in ("check", "agreement"):
            c = r.get(field_name)
            key = (r["shape"], r["tokens"], r["objective"], r["dtype"], r["inputs"], r["provider"], field_name)
            if not c or c.get("reference") or key in seen or "loss_rel_err" not in c:
                continue
            seen.add(key)
            rows.append([r["shape"], _tokens(r["tokens"]), r["objective"], r["dtype"], r["inputs"], r["provider"],
                         c.get("against", "dft-ops"), _fmt(c["loss_rel_err"], ".1e"),
                         _fmt(c["grad_hidden_rel_err"], ".1e"), _fmt(c["grad_weight_rel_err"], ".1e"),
                         f"{c['loss_tol']:.0e} / {c['grad_tol']:.0e}", "ok" if c["ok"] else "MISMATCH"])
    return header, rows


def skipped_providers(records: list[dict]) -> dict[str, str]:
    """provider -> reason, for providers skipped everywhere (not installed, needs CUDA, ...)."""
    reasons = defaultdict(set)
    ran = set()
    for r in records:
        if r["status"] == "skipped" and "time budget" not in (r.get("reason") or ""):
            reasons[r["provider"]].add(r["reason"])
        else:
            ran.add(r["provider"])
    return {p: "; ".join(sorted(v)) for p, v in reasons.items() if p not in ran}


def write_markdown(path: Path, data: dict, plots: list[Path]) -> None:
    records = data["records"]
    last = data["runs"][-1] if data.get("runs") else {}
    cpu = data.get("device_kind") == "cpu"
    out = [f"# dft-ops benchmarks: {data['device']}", ""]
    if cpu:
        out += ["**These are CPU numbers** (a small run on a machine without a GPU): wall-clock and process CPU "
                "time, and the peak resident set size. They show that every provider runs and agrees with "
                "dft-ops, not how the GPU kernels perform (dft-ops runs its chunked PyTorch backend here), and on a "
                "machine shared with other jobs they can vary severalfold between runs.", ""]
    if last.get("triton_interpret"):
        out += ["**Triton kernels ran on the CPU interpreter (TRITON_INTERPRET=1)**: this run only "
                "checks that the Triton providers agree with dft-ops (no times or memory).", ""]
    out += [f"Generated by `python -m bench` (latest run: {last.get('started', '?')}, commit "
            f"`{last.get('commit', '?')}`, command `{last.get('argv', '?')}`).", ""]
    v = last.get("versions", {})
    out += ["Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".", ""]
    if last.get("gemm_tflops"):
        out += [f"GEMM yardstick: {last['gemm_tflops']:.2f} TFLOP/s ({last.get('gemm_dtype')} "
                f"{last.get('gemm_note')}), measured in the same run; `% GEMM` is TFLOP/s over it.", ""]
    out += [
        f"- Time: {last.get('time_metric')}; `ms median` over the runs. TFLOP/s counts the unavoidable "
        "GEMM work only: 2NDV forward, 4NDV backward, 6NDV forward+backward.",
        f"- Memory: {last.get('memory_metric')}. The lower bound is the gradient buffers "
        "((N + V) x D in the input dtype) for modes with a backward, 0 for forward; `extra MB` = peak - bound. "
        "MB = 2^20 bytes.",
        "- Inputs: `peaked` = hidden states pushed along their label's weight row (the label's probability "
        "spread over (0, 1), median near 0.9; the rest of the softmax tiny); `random` = flat softmax. "
        "No label is ignored.",
        "- `check`: each provider's loss and gradients against a float64 reference on the same inputs "
        "(materialized logits in token chunks, bench/reference.py), before timing; the correctness table also "
        "gives each one's agreement with dft-ops. `runs`: timed runs behind the median (`cut`: the run's time "
        "budget stopped it early).",
        "",
    ]
    skipped = skipped_providers(records)
    if skipped:
        out += ["## Skipped providers", ""] + [f"- `{p}`: {reason}" for p, reason in skipped.items()] + [""]
    header, rows = check_rows(records)
    if rows:
        out += ["## Correctness against float64 (and agreement with dft-ops)", "", markdown_table(header, rows), ""]
    shown = [r for r in records if r["provider"] not in skipped]
    summary = summary_lines(shown)
    if summary:
        out += ["## Summary: dft-ops against the fastest peer, forward+backward", ""] + [f"- {s}" for s in summary]
        out += [""]
    if any(r.get("shape") == "cpu-goal" for r in records):
        from .goals import cpu_evaluate  # the goals read this module's records; imported where they are shown

        lines = cpu_evaluate(data)
        out += ["## The CPU goal (issue 16), from this file's runs", "",
                markdown_table(["goal", "measured", "target", "verdict"],
                               [[g.what, g.measured, g.target, g.verdict] for g in lines]), ""]
    header, rows = result_rows(shown, cpu)
    out += ["## Results", "", markdown_table(header, rows), ""]
    if backward_in_forward(shown):
        out += [BACKWARD_IN_FORWARD_NOTE, ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if last.get("not_run"):
        out += [f"Cases not run (time budget of the latest run): {', '.join(last['not_run'])}", ""]
    path.write_text("\n".join(out))


# --- plots --------------------------------------------------------------------------------------------

def _figure_notes(fig, data: dict, legend_handles) -> None:
    """The legend below the axes (it never covers a line) and, for a CPU run, what ran."""
    handles, labels = legend_handles
    notes = [CPU_NOTE] if data.get("device_kind") == "cpu" else []
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 5),
                   fontsize=8, frameon=False)
    if notes:
        fig.text(0.5, -0.06 if handles else 0.0, "\n".join(notes), ha="center", va="top", fontsize=8, style="italic")


def _legend_entries(axes) -> tuple[list, list]:
    """One legend entry per label across every axis, in plotting order."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def write_plots(out_dir: Path, stem: str, data: dict) -> list[Path]:
    """One PNG per dtype x inputs x objective x mode: time and peak memory against tokens, one column per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["records"] if r["status"] == "ok"]
    groups = defaultdict(list)
    for r in ok:
        groups[(r["dtype"], r["inputs"], r["objective"], r["mode"])].append(r)
    mem_label = "peak RSS delta (MB, CPU)" if data.get("device_kind") == "cpu" else "peak memory over inputs (MB)"
    paths = []
    for (dtype, inputs, objective, mode), recs in sorted(groups.items()):
        shapes = sorted({r["shape"] for r in recs}, key=lambda s: list(HEADS).index(s) if s in HEADS else 99)
        if not any(len({r["tokens"] for r in recs if r["shape"] == s}) > 1 for s in shapes):
            continue  # a single token count per head: the table says it all
        fig, axes = plt.subplots(2, len(shapes), figsize=(max(7.0, 4.2 * len(shapes)), 7), squeeze=False)
        ticks = sorted({r["tokens"] for r in recs})
        for col, shape in enumerate(shapes):
            for provider in PROVIDER_ORDER:
                pts = sorted((r["tokens"], r["ms_median"], r.get("peak_mb")) for r in recs
                             if r["shape"] == shape and r["provider"] == provider)
                if not pts:
                    continue
                style = dict(marker="o", lw=2.5 if provider.startswith("dft-ops") else 1.2, label=provider)
                axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], **style)
                if all(p[2] is not None for p in pts):
                    axes[1][col].plot([p[0] for p in pts], [max(p[2], 1e-3) for p in pts], **style)
            head = next(r for r in recs if r["shape"] == shape)
            axes[0][col].set_title(f"{shape} (D={head['hidden']}, V={head['vocab']})", fontsize=9)
            for row, label in enumerate(("time (ms, median)", mem_label)):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_xticks(ticks, [_tokens(n) for n in ticks])
                ax.minorticks_off()
                ax.set_yscale("log")
                ax.set_xlabel("tokens")
                ax.grid(True, which="both", alpha=0.3)
                if col == 0:
                    ax.set_ylabel(label)
        fig.suptitle(f"{data['device']}: {objective}, {mode}, {dtype}, {inputs} inputs", fontsize=11)
        fig.tight_layout()
        _figure_notes(fig, data, _legend_entries(axes.flat))
        path = out_dir / f"{stem}-{dtype}-{inputs}-{objective}-{MODE_SHORT[mode].replace('+', '-')}.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def write_workspace_plots(out_dir: Path, stem: str, data: dict) -> list[Path]:
    """The workspace sweep: time and peak memory of the "gemm" backward against its workspace, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["records"] if r["status"] == "ok" and r.get("workspace_mb")]
    groups = defaultdict(list)
    for r in ok:
        groups[(r["dtype"], r["inputs"], r["objective"], r["mode"])].append(r)
    paths = []
    for (dtype, inputs, objective, mode), recs in sorted(groups.items()):
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        cases = sorted({(r["shape"], r["tokens"]) for r in recs},
                       key=lambda c: (list(HEADS).index(c[0]) if c[0] in HEADS else 99, c[1]))
        for shape, tokens in cases:
            pts = sorted((r["workspace_mb"], r["ms_median"], r.get("peak_mb")) for r in recs
                         if (r["shape"], r["tokens"]) == (shape, tokens))
            label = f"{shape} @ {_tokens(tokens)}"
            ax_time.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            if all(p[2] is not None for p in pts):
                ax_mem.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
        for ax, ylabel in ((ax_time, "time (ms, median)"), (ax_mem, "peak memory over inputs (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("workspace_mb (MiB)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"{data['device']}: backward_mode='gemm' against its workspace; {objective}, {mode}, {dtype}, "
                     f"{inputs} inputs", fontsize=10)
        fig.tight_layout()
        _figure_notes(fig, data, _legend_entries([ax_time, ax_mem]))
        path = out_dir / f"{stem}-{dtype}-{inputs}-{objective}-{MODE_SHORT[mode].replace('+', '-')}.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
