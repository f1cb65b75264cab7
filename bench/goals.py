"""The performance goal (issue 3), read from GPU results: one line per goal, measured / target / met.

All on the H100, bf16, forward+backward, DFT, peaked inputs, at llama3-8b x 16k
tokens and gemma2-2b x 8k tokens:

- time <= 0.7x Liger with use_token_scaling, <= 1.0x Cut Cross-Entropy
  computing plain CE, <= 0.8x TRL's fused head computing DFT, <= 1.0x
  torch.compile of materialized CE + DFT weighting;
- extra peak memory within 16 MB of the lower bound;
- >= 60% of the measured GEMM rate at 6NDV FLOPs;
- and 128k tokens on the qwen2.5-7b head run on one 80 GB GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .cases import GOAL_TOKENS, LONG_CONTEXT

H100_80GB_MB = 81559  # what an H100 80GB HBM3 reports (MiB)

# (peer provider, peer objective, what it is, target ratio of dft-ops' time to the peer's)
TIME_GOALS = (
    ("liger", "dft", "Liger FLCE use_token_scaling (DFT)", 0.7),
    ("cce", "ce", "Cut Cross-Entropy, plain CE", 1.0),
    ("trl", "dft", "TRL fused LM head, DFT", 0.8),
    ("torch-compile", "dft", "torch.compile materialized CE + DFT", 1.0),
)


@dataclass
class GoalLine:
    what: str
    measured: str
    target: str
    verdict: str  # "met", "not met", "not measured"

    def __str__(self) -> str:
        return f"{self.what:62s} {self.measured:>10s}   target {self.target:12s} {self.verdict}"


def _find(records, provider, objective, shape, tokens):
    for r in records:
        if (r["provider"], r["objective"], r["shape"], r["tokens"]) == (provider, objective, shape, tokens) \
                and r["dtype"] == "bf16" and r["mode"] == "forward+backward" and r["inputs"] == "peaked":
            return r
    return None


def _absent(rec, who: str) -> str | None:
    """Why a record gives no number, or None when it does."""
    if rec is None:
        return f"{who}: no result"
    if rec["status"] != "ok":
        return f"{who}: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else "")
    return None


def evaluate(records: list[dict], ours_name: str = "dft-ops") -> list[GoalLine]:
    """Goal lines for ``ours_name`` (dft-ops as it ships; "dft-ops-filter": with gradient filtering)."""
    lines = []
    for shape, tokens in GOAL_TOKENS.items():
        at = f"{shape} @ {tokens // 1024}k"
        ours = _find(records, ours_name, "dft", shape, tokens)
        for peer, peer_obj, label, target in TIME_GOALS:
            what = f"{at}: time vs {label}"
            theirs = _find(records, peer, peer_obj, shape, tokens)
            why = _absent(ours, ours_name)
            if why:
                lines.append(GoalLine(what, "-", f"<= {target:.2f}x", f"not measured ({why})"))
            elif theirs is not None and theirs["status"] == "oom":
                lines.append(GoalLine(what, "peer OOM", f"<= {target:.2f}x", "met (the peer ran out of memory)"))
            elif _absent(theirs, peer):
                lines.append(GoalLine(what, "-", f"<= {target:.2f}x", f"not measured ({_absent(theirs, peer)})"))
            else:
                ratio = ours["ms_median"] / theirs["ms_median"]
                lines.append(GoalLine(what, f"{ratio:.2f}x", f"<= {target:.2f}x",
                                      "met" if ratio <= target else "not met"))
        why = _absent(ours, ours_name)
        extra = None if why else ours.get("extra_mb")
        lines.append(GoalLine(f"{at}: extra peak memory over the lower bound",
                              "-" if extra is None else f"{extra:+.1f} MB", "<= 16 MB",
                              f"not measured ({why})" if why else ("met" if extra <= 16 else "not met")))
        frac = None if why else ours.get("gemm_fraction")
        lines.append(GoalLine(f"{at}: share of the measured GEMM rate (6NDV)",
                              "-" if frac is None else f"{100 * frac:.1f}%", ">= 60%",
                              f"not measured ({why})" if why else ("met" if frac >= 0.6 else "not met")))
    shape, tokens = LONG_CONTEXT
    rec = _find(records, ours_name, "dft", shape, tokens)
    what = f"{shape} @ {tokens // 1024}k: runs on one 80 GB GPU (peak allocated)"
    if rec is None or rec["status"] == "skipped" or rec["status"] == "error":
        lines.append(GoalLine(what, "-", f"<= {H100_80GB_MB} MB",
                              f"not measured ({_absent(rec, ours_name) or 'no result'})"))
    elif rec["status"] == "oom":
        lines.append(GoalLine(what, "OOM", f"<= {H100_80GB_MB} MB", "not met"))
    else:
        total = rec.get("peak_total_mb")
        lines.append(GoalLine(what, f"{total:.0f} MB", f"<= {H100_80GB_MB} MB",
                              "met" if total <= H100_80GB_MB else "not met"))
    return lines


def gpu_result_files(results_dir: Path) -> list[tuple[str, list[dict], Path]]:
    """(device, records, file) for every GPU result file, H100 first."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("device_kind") == "cuda":
            found.append((data.get("device", path.stem), data.get("records", []), path))
    return sorted(found, key=lambda f: "h100" not in f[0].lower())


def report(results_dir: Path) -> str:
    header = "Goals (H100, bf16, forward+backward, DFT, peaked inputs): measured / target / verdict"
    files = gpu_result_files(results_dir)
    if not files:
        lines = evaluate([])
        return "\n".join([header, f"No GPU result in {results_dir}: every goal is not measured yet."] +
                         [str(GoalLine(g.what, "-", g.target, "not measured (no GPU result)")) for g in lines])
    out = []
    for device, records, path in files:
        note = "" if "h100" in device.lower() else " (the goals are set for an H100)"
        out += [header, f"measured on {device}{note}, from {path.name}:"] + [str(g) for g in evaluate(records)] + [""]
        if any(r["provider"] == "dft-ops-filter" for r in records):
            out += ["The same for dft-ops with gradient filtering (filter_eps = eps/32, CCE's default; opt-in):"]
            out += [str(g) for g in evaluate(records, "dft-ops-filter")] + [""]
    return "\n".join(out).rstrip()
