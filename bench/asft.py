"""The ASFT case: DFT plus a KL term to a frozen reference head, fused vs materialized.

    python -m bench.asft                      # GPU: llama3-8b head @ 16k tokens, bf16; CPU: tiny head, fp32
    python -m bench.asft --shapes llama3-8b --tokens 4k 16k --direction reverse --out docs/benchmarks

Providers, on the same inputs (the model's head and hidden states, the
reference's head and hidden states, labels), each computing the mean over
tokens of ``-sg(p_y) log p_y + kl_coef * KL`` and the gradients of the model's
hidden states and head (the reference gets none):

- ``dft-ops``: ``linear_cross_entropy(objective=ASFT(...), second_head=SecondHead(ref_h, ref_w))``
  - both heads streamed through one online pass, no logits of either;
- ``unsloth-style``: what Unsloth's ASFT does at the head: the model's logits
  materialized in fp32 (log-softmax over the whole vocabulary), the reference's
  logits computed in token chunks under ``no_grad`` and the KL taken per chunk
  (``F.kl_div``, which keeps each chunk's reference probabilities for backward);
- ``torch``: plain PyTorch: both heads' logits materialized in fp32.

The reference is the model's head and hidden states perturbed by a little noise
(a fine-tuned model stays close to its reference), on top of the benchmark's
``peaked`` inputs. Time: forward+backward (the GPU meter's CUDA events, or CPU
wall clock); memory: the peak over what was allocated before the step. Each
provider's loss and gradients are checked against ``torch`` in fp32 (the float
reference here, since every provider computes the same formula).

Writes ``<device>-asft.json`` (merged across runs), ``<device>-asft.md`` and
``<device>-asft-fwd-bwd.png`` under ``--out`` (default: a scratch folder);
``python -m bench --report`` rebuilds the last two from the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import case_plots, measure
from .cases import DTYPES, Case, dtype_name, make_inputs, parse_head, parse_tokens
from .environment import SCRATCH_DIR, git_commit, slug, versions

MB = 2**20
PROVIDERS = ("dft-ops", "unsloth-style", "torch")
REFERENCE_NOISE = 0.05  # relative size of the reference's perturbation
UNSLOTH_CHUNK = 1024  # tokens per reference chunk (Unsloth streams the reference by sequence chunks)


def make_asft_inputs(head: str, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """hidden (N, D), weight (V, D), labels (N,), ref_hidden (N, D), ref_weight (V, D): one set for every provider."""
    inputs = make_inputs(Case(parse_head(head), tokens, "dft", "peaked", dtype, ("forward+backward",)), device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)

    def near(t: Tensor) -> Tensor:
        noise = torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32)
        return (t.float() + REFERENCE_NOISE * t.float().std() * noise).to(dtype)

    return dict(hidden=inputs.hidden, weight=inputs.weight, labels=inputs.labels, ref_hidden=near(inputs.hidden),
                ref_weight=near(inputs.weight))


def _dft_value(logp_all: Tensor, labels: Tensor) -> Tensor:
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    return -logp.exp().detach() * logp


def _kl(logp_all: Tensor, logq_all: Tensor, direction: str) -> Tensor:
    """Per-token KL from log-softmaxes: forward KL(q || p), reverse KL(p || q)."""
    if direction == "forward":
        return F.kl_div(logp_all, logq_all, reduction="none", log_target=True).sum(-1)
    return F.kl_div(logq_all, logp_all, reduction="none", log_target=True).sum(-1)


def torch_asft(h, w, y, ref_h, ref_w, kl_coef: float, direction: str) -> Tensor:
    logp_all = F.log_softmax(F.linear(h, w).float(), -1)
    with torch.no_grad():
        logq_all = F.log_softmax(F.linear(ref_h, ref_w).float(), -1)
    return (_dft_value(logp_all, y) + kl_coef * _kl(logp_all, logq_all, direction)).mean()


def unsloth_style_asft(h, w, y, ref_h, ref_w, kl_coef: float, direction: str, chunk: int = UNSLOTH_CHUNK) -> Tensor:
    logp_all = F.log_softmax(F.linear(h, w).float(), -1)
    kl = []
    for start in range(0, h.shape[0], chunk):
        with torch.no_grad():
            logq = F.log_softmax(F.linear(ref_h[start:start + chunk], ref_w).float(), -1)
        kl.append(_kl(logp_all[start:start + chunk], logq, direction))
    return (_dft_value(logp_all, y) + kl_coef * torch.cat(kl)).mean()


def dft_ops_asft(h, w, y, ref_h, ref_w, kl_coef: float, direction: str) -> Tensor:
    import dft_ops

    asft = dft_ops.objectives.ASFT(kl_coef, direction=direction)
    # as shipped: the Triton kernels on CUDA; on a CPU the PyTorch backend (also under TRITON_INTERPRET)
    return dft_ops.linear_cross_entropy(h, w, y, objective=asft, second_head=dft_ops.SecondHead(ref_h, ref_w),
                                        backend="auto" if h.is_cuda else "torch")


LOSSES = {"dft-ops": dft_ops_asft, "unsloth-style": unsloth_style_asft, "torch": torch_asft}


def run(heads, tokens, dtype, direction: str, kl_coef: float, meter, providers=PROVIDERS, log=print,
        emit=lambda records: None) -> list[dict]:
    """One record per head x tokens x provider: time, memory, and the check against ``torch`` in fp32;
    ``emit(records so far)`` after each provider (a GPU window writes them at once)."""
    device = meter.device
    records = []
    for head in heads:
        for n in tokens:
            inputs = make_asft_inputs(head, n, dtype, device)
            h, w, y, ref_h, ref_w = (inputs[k] for k in ("hidden", "weight", "labels", "ref_hidden", "ref_weight"))
            try:  # the float reference: materialized fp32 logits of both heads
                reference, ref_error = _loss_and_grads(torch_asft, h.float(), w.float(), y, ref_h.float(),
                                                       ref_w.float(), kl_coef, direction), None
            except Exception as exc:
                reference, ref_error = None, measure.brief(exc)
            for name in providers:
                rec = dict(provider=name, shape=head, hidden=h.shape[1], vocab=w.shape[0], tokens=n,
                           dtype=dtype_name(dtype), direction=direction, kl_coef=kl_coef, mode="forward+backward")
                fn = LOSSES[name]
                measure_provider(rec, lambda hh, ww: fn(hh, ww, y, ref_h, ref_w, kl_coef, direction), h, w,
                                 reference, ref_error, meter, log=log, label=f"{head} N={n} {name:14s}")
                records.append(rec)
                emit(records)
            del inputs, h, w, ref_h, ref_w, reference
            meter.cleanup()
    return records


def measure_provider(rec: dict, loss_of, h: Tensor, w: Tensor, reference: measure.Result | None, ref_error,
                     meter, log=print, label: str = "", against: str = "torch fp32") -> dict:
    """One provider's record: ``loss_of(h, w)`` checked against ``reference`` (or the reason there is none),
    then timed forward+backward and its peak memory measured; an OOM or an error is a result, not a crash.
    Updates and returns ``rec``."""
    dtype = h.dtype
    try:
        result = measure.loss_and_grads(lambda hh, ww, _: loss_of(hh, ww), h, w, None)
        rec["check"] = (measure.compare(result, reference, dtype, against) if reference is not None
                        else {"ok": None, "reason": ref_error})
        del result
        leaves = [h.detach().requires_grad_(), w.detach().requires_grad_()]

        def step(_):
            loss_of(leaves[0], leaves[1]).backward()

        timing = meter.time(step, grad_to_none=leaves)
        for leaf in leaves:  # the step's gradient buffers count in its peak, as for a first step
            leaf.grad = None
        memory = meter.memory(step)
        rec.update(status="ok", **timing.summary())
        if memory is not None:
            rec.update(peak_mb=memory.peak_bytes / MB)
    except Exception as exc:  # an OOM (or a missing backend) is a result, not a crash
        rec.update(status="oom" if measure.is_oom(exc) else "error", reason=measure.brief(exc))
    meter.cleanup()
    if rec["status"] == "ok":
        log(f"  {label} {rec['ms_median']:9.2f} ms  peak {rec.get('peak_mb', math.nan):9.1f} MB  check "
            f"{case_plots.verdict(rec)}")
    else:
        log(f"  {label} {rec['status']}: {rec['reason']}")
    return rec


def _loss_and_grads(fn, h, w, y, ref_h, ref_w, kl_coef, direction) -> measure.Result:
    return measure.loss_and_grads(lambda hh, ww, yy: fn(hh, ww, yy, ref_h, ref_w, kl_coef, direction), h, w, y)


# --- results ------------------------------------------------------------------------------------------

def _key(r: dict) -> tuple:
    return (r["shape"], r["tokens"], r["dtype"], r["direction"], r["provider"])


def _order(r: dict) -> tuple:
    return (r["shape"], r["dtype"], r["direction"], r["tokens"], PROVIDERS.index(r["provider"]))


def merge(path: Path, records: list[dict], run_info: dict, key=_key, order=_order) -> dict:
    """The results file at ``path`` with ``records`` merged in (a case measured again replaces its record,
    ``key``; sorted by ``order``) and this run's description; written back, and returned."""
    data = json.loads(path.read_text()) if path.exists() else {"records": [], "runs": []}
    by_key = {key(r): r for r in data["records"]}
    by_key.update({key(r): r for r in records})
    data["records"] = sorted(by_key.values(), key=order)
    data["runs"] = [r for r in data["runs"] if r.get("started") != run_info.get("started")] + [run_info]
    data["device"], data["device_kind"] = run_info["device"], run_info["device_kind"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return data


def markdown(data: dict, plot: Path | None) -> str:
    runs = data["runs"][-1]
    lines = [f"# ASFT benchmark: {data['device']}", "",
             f"Commit {runs['commit']}, {runs['versions'].get('torch')} torch, measured {runs['started']}. "
             f"Loss: mean of DFT + kl_coef x KL over tokens; forward+backward. Time: {runs['time_metric']}. "
             f"Memory: {runs['memory_metric']}.", "",
             "| head | tokens | dtype | KL | provider | ms median | peak MB | loss / d(hidden) / d(weight) rel err "
             "vs torch fp32 | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["records"]:
        ms, peak, errs, status = case_plots.record_cells(r, ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err"))
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['dtype']} | {r['direction']} | {r['provider']} | {ms} | "
                     f"{peak} | {errs} | {status} |")
    if data.get("device_kind") == "cpu":
        lines += ["", "CPU run: dft-ops runs its PyTorch backend here (the Triton kernels need a GPU): its one-pass "
                      "head holds one fp32 chunk of up to 512 tokens x the vocabulary per head and the head's fp32 "
                      "gradients, as large as the whole logits up to 512 tokens; past that the materialized "
                      "providers grow with tokens x vocabulary and it does not. Times are CPU times, not the GPU "
                      "kernels'."]
    if plot is not None:
        lines += ["", f"![ASFT time and memory]({plot.name})"]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> Path | None:
    return case_plots.plot_time_and_memory(data, path, list(PROVIDERS), ("shape", "dtype", "direction"),
                                           lambda g: f"{g[0]}, {g[1]}, {g[2]} KL",
                                           "ASFT (DFT + KL to a reference head)")


def write_reports(out: Path, stem: str, data: dict, plots: bool = True) -> list[Path]:
    """``<stem>.md`` and (``plots``) ``<stem>-fwd-bwd.png`` from the merged results."""
    return case_plots.write_reports(out, stem, data, markdown, plot, plots)


def case_setup(args, argv, prog: str, gpu_tokens: list[int]):
    """(meter, heads, tokens, dtype, run_info) from a case's ``--device``, ``--shapes``, ``--tokens`` and
    ``--dtype`` (defaults: llama3-8b at ``gpu_tokens`` in bf16 on a GPU, the tiny head at 256, 1024 and
    4096 tokens in fp32 on a CPU), ``run_info`` this run's description in the results file; None, said
    on stderr, when ``--device cuda`` finds no CUDA device. A bad head name fails here, before anything runs."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return None
    gpu = device.type == "cuda"
    meter = measure.GpuMeter(device) if gpu else measure.CpuMeter(max_runs=5, rep_ms=500)
    heads = args.shapes or (["llama3-8b"] if gpu else ["tiny"])
    for head in heads:
        parse_head(head)
    tokens = args.tokens or (list(gpu_tokens) if gpu else [256, 1024, 4096])
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    run_info = {"started": started, "argv": " ".join([prog, *(argv or sys.argv[1:])]),
                "device": meter.name(), "device_kind": meter.kind, "versions": versions(), "commit": git_commit(),
                "time_metric": meter.time_metric, "memory_metric": meter.memory_metric,
                "threads": torch.get_num_threads()}
    return meter, heads, tokens, dtype, run_info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.asft", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"))
    p.add_argument("--shapes", nargs="+", help="heads: presets or DxV (default: llama3-8b on GPU, tiny on CPU)")
    p.add_argument("--tokens", nargs="+", type=parse_tokens, help="default: 16k on GPU, 256 1024 4096 on CPU")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--direction", choices=("forward", "reverse"), default="forward")
    p.add_argument("--kl-coef", type=float, default=0.1)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--out", type=Path, default=SCRATCH_DIR)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    setup = case_setup(args, argv, "python -m bench.asft", gpu_tokens=[16 * 1024])
    if setup is None:
        return 2
    meter, heads, tokens, dtype, run_info = setup
    print(f"ASFT benchmark on {meter.name()}: {heads} x {tokens} tokens, {dtype_name(dtype)}, {args.direction} KL, "
          f"kl_coef {args.kl_coef}", flush=True)
    stem = slug(meter.name()) + "-asft"
    # the JSON after every provider: a GPU window's call cut at its limit keeps what it measured
    records = run(heads, tokens, dtype, args.direction, args.kl_coef, meter, args.providers,
                  log=lambda line: print(line, flush=True),
                  emit=lambda recs: merge(args.out / f"{stem}.json", recs, run_info))
    data = merge(args.out / f"{stem}.json", records, run_info)
    written = write_reports(args.out, stem, data, not args.no_plot)
    print(f"wrote {args.out / stem}.json, " + ", ".join(str(p) for p in written))
    bad = [r for r in records if r["status"] == "ok" and (r.get("check") or {}).get("ok") is False]
    for r in bad:
        print(f"MISMATCH vs torch fp32: {r['provider']} {r['shape']} N={r['tokens']}: {r['check']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
