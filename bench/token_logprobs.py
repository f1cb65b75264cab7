"""The RL case: per-token log-probs and entropies, forward and backward, fused vs materialized.

    python -m bench.token_logprobs            # GPU: llama3-8b and qwen2.5-7b heads @ 4k and 16k tokens, bf16;
                                              # CPU: the tiny head @ 256, 1024, 4096 tokens, fp32
    python -m bench.token_logprobs --shapes llama3-8b --tokens 16k --modes forward forward+backward --out DIR

Providers, on the same inputs (hidden states, head, labels; a temperature of 0.9), each returning the
per-token ``(logprob, entropy)`` that RL losses are elementwise on; the backward takes fixed random
upstream gradients of both at once (``sum(g_l logprob + g_H entropy)``, what a PPO/GRPO loss with an
entropy bonus hands back):

- ``dft-ops``: ``dft_ops.token_logprobs`` as shipped (the Triton kernels on CUDA, the PyTorch backend on
  a CPU), never a tokens x vocabulary tensor;
- ``torch``: materialized PyTorch, what trainers write: ``F.linear`` logits in the input dtype,
  ``.float() / T``, ``log_softmax`` + ``gather`` + ``-(p * log p).sum(-1)``;
- ``verl-torch``: verl's ``FusedLinearForPPO`` (its ``use_fused_kernels`` torch path: 512-token chunks of
  materialized logits, recomputed in backward), when verl is installed;
- ``verl-triton``: verl's fused kernel ``verl.utils.kernel.linear_cross_entropy`` (CUDA only), when
  verl is installed.

Every provider's values and gradients are checked against a float64 reference computed in token chunks
(materialized float64 logits per chunk, autograd) before timing. Time: median forward or forward+backward
(the GPU meter's CUDA events, or CPU wall clock); memory: the peak over what was allocated before the
step (GPU: ``max_memory_allocated``; CPU: resident set size). Writes ``<device>-token-logprobs.json``
(merged across runs), ``.md`` and ``-fwd-bwd.png`` under ``--out`` (default: a scratch folder).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import asft, case_plots, measure
from .cases import DTYPES, Case, dtype_name, make_inputs, parse_head, parse_tokens
from .environment import SCRATCH_DIR, git_commit, slug, versions

MB = 2**20
PROVIDERS = ("dft-ops", "torch", "verl-torch", "verl-triton")
MODES = ("forward", "forward+backward")
TEMPERATURE = 0.9
REFERENCE_CHUNK = 2048  # tokens per float64 reference chunk (its logits: chunk x V float64)


def dft_ops_fn(h, w, y, t):
    import dft_ops

    return dft_ops.token_logprobs(h, w, y, temperature=t, backend="auto" if h.is_cuda else "torch")


def torch_fn(h, w, y, t):
    logp_all = torch.log_softmax(F.linear(h, w).float() / t, dim=-1)
    return logp_all.gather(-1, y[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


def verl_torch_fn(h, w, y, t):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    logp, entropy = FusedLinearForPPO()(h, w, y, temperature=t)
    return logp, entropy.float()


def verl_triton_fn(h, w, y, t):
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, y, float(t), "none")


FNS = {"dft-ops": dft_ops_fn, "torch": torch_fn, "verl-torch": verl_torch_fn, "verl-triton": verl_triton_fn}


def skip_reason(name: str, device: torch.device) -> str | None:
    """Why a provider cannot run here, or None."""
    if name.startswith("verl") and importlib.util.find_spec("verl") is None:
        return "verl is not installed (pip install verl; docs/integrations.md)"
    if name == "verl-triton" and device.type != "cuda":
        return "verl's fused kernel needs CUDA"
    return None


def upstream(n: int, device) -> tuple[Tensor, Tensor]:
    """The fixed random upstream gradients (g_l, g_H) of the logprobs and entropies, (N,) float32 each."""
    gen = torch.Generator(device=device).manual_seed(17)
    return torch.randn(n, generator=gen, device=device), 0.1 * torch.randn(n, generator=gen, device=device)


def objective(fn, g_l, g_h):
    """fn(h, w, y, T) -> (logprob, entropy) as a scalar whose backward hands (g_l, g_h) to both outputs, and the
    outputs (detached) for the check."""
    def loss(h, w, y):
        logp, entropy = fn(h, w, y, TEMPERATURE)
        loss.outputs = (logp.detach().float(), entropy.detach().float())
        return (logp.float() * g_l).sum() + (entropy.float() * g_h).sum()

    return loss


def reference(h: Tensor, w: Tensor, y: Tensor, g_l: Tensor, g_h: Tensor) -> tuple[measure.Result, tuple]:
    """The float64 truth in token chunks: materialized float64 logits per chunk, gradients by autograd."""
    w64 = w.detach().double().requires_grad_()
    d_hidden = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    logps, entropies, total = [], [], 0.0
    for lo in range(0, h.shape[0], REFERENCE_CHUNK):
        hi = min(lo + REFERENCE_CHUNK, h.shape[0])
        h64 = h[lo:hi].detach().double().requires_grad_()
        logp_all = torch.log_softmax((h64 @ w64.T) / TEMPERATURE, dim=-1)
        logp = logp_all.gather(-1, y[lo:hi, None])[:, 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        part = (logp * g_l[lo:hi].double()).sum() + (entropy * g_h[lo:hi].double()).sum()
        part.backward()
        d_hidden[lo:hi] = h64.grad
        logps.append(logp.detach())
        entropies.append(entropy.detach())
        total += part.item()
        del logp_all, h64
    result = measure.Result(torch.tensor(total, dtype=torch.float64), d_hidden, w64.grad)
    return result, (torch.cat(logps), torch.cat(entropies))


def check(result: measure.Result, outputs: tuple, truth: measure.Result, truth_outputs: tuple, dtype) -> dict:
    """The provider's gradients and its per-token values against float64, with measure.compare's tolerances
    for the dtype (the values: its gradient tolerance; 16-bit logits, as the torch provider builds them,
    round each logit to 2^-9)."""
    out = measure.compare(result, truth, dtype, "float64")
    out["logprob_rel_err"] = measure.rel_err(outputs[0], truth_outputs[0])
    out["entropy_rel_err"] = measure.rel_err(outputs[1], truth_outputs[1])
    value_tol = out["grad_tol"]
    out["ok"] = bool(out["ok"] and out["logprob_rel_err"] < value_tol and out["entropy_rel_err"] < value_tol)
    return out


def run(heads, tokens, dtype, modes, meter, providers=PROVIDERS, log=print, emit=lambda records: None) -> list[dict]:
    """One record per head x tokens x provider x mode; ``emit(records so far)`` after each."""
    device = meter.device
    records = []
    for head in heads:
        for n in tokens:
            inputs = make_inputs(Case(parse_head(head), n, "ce", "peaked", dtype, tuple(modes)), device)
            h, w, y = inputs.hidden, inputs.weight, inputs.labels
            g_l, g_h = upstream(n, device)
            try:
                truth, truth_outputs = reference(h, w, y, g_l, g_h)
            except Exception as exc:  # e.g. the float64 chunk does not fit: unchecked, still timed
                truth, truth_outputs = None, measure.brief(exc)
            for name in providers:
                base = dict(provider=name, shape=head, hidden=h.shape[1], vocab=w.shape[0], tokens=n,
                            dtype=dtype_name(dtype), temperature=TEMPERATURE)
                reason = skip_reason(name, device)
                if reason is not None:
                    records.append({**base, "mode": "-", "status": "skipped", "reason": reason})
                    emit(records)
                    continue
                loss = objective(FNS[name], g_l, g_h)
                try:
                    result = measure.loss_and_grads(loss, h, w, y)
                    verdict = (check(result, loss.outputs, truth, truth_outputs, dtype) if truth is not None
                               else {"ok": None, "reason": truth_outputs})
                    del result
                except Exception as exc:
                    verdict = {"ok": None, "reason": measure.brief(exc)}
                for mode in modes:
                    rec = {**base, "mode": mode, "check": verdict}
                    try:
                        rec.update(_measure(meter, loss, h, w, y, mode))
                    except Exception as exc:  # an OOM (or a missing backend) is a result, not a crash
                        rec.update(status="oom" if measure.is_oom(exc) else "error", reason=measure.brief(exc))
                    meter.cleanup()
                    if rec["status"] == "ok":
                        log(f"  {head} N={n} {name:12s} {mode:17s} {rec['ms_median']:9.2f} ms  peak "
                            f"{rec.get('peak_mb', math.nan):9.1f} MB  check {case_plots.verdict(rec)}")
                    else:
                        log(f"  {head} N={n} {name:12s} {mode:17s} {rec['status']}: {rec['reason']}")
                    records.append(rec)
                    emit(records)
            del inputs, h, w, truth
            meter.cleanup()
    return records


def _measure(meter, loss, h, w, y, mode: str) -> dict:
    leaves = [h.detach().requires_grad_(), w.detach().requires_grad_()]

    def step(_):
        value = loss(leaves[0], leaves[1], y)
        if mode == "forward+backward":
            value.backward()

    timing = meter.time(step, grad_to_none=leaves)
    for leaf in leaves:  # the step's gradient buffers count in its peak, as for a first step
        leaf.grad = None
    memory = meter.memory(step)
    out = dict(status="ok", **timing.summary())
    if memory is not None:
        out["peak_mb"] = memory.peak_bytes / MB
    return out


# --- results ------------------------------------------------------------------------------------------

def _key(r: dict) -> tuple:
    return (r["shape"], r["tokens"], r["dtype"], r["mode"], r["provider"])


def _order(r: dict) -> tuple:
    return (r["shape"], r["dtype"], r["mode"], r["tokens"], PROVIDERS.index(r["provider"]))


def merge(path: Path, records: list[dict], run_info: dict) -> dict:
    """The results file with ``records`` replacing those of the same case, and this run's information."""
    return asft.merge(path, records, run_info, key=_key, order=_order)


def markdown(data: dict, plot: Path | None) -> str:
    run_info = data["runs"][-1]
    lines = [f"# Per-token log-probs and entropies: {data['device']}", "",
             f"Commit {run_info['commit']}, torch {run_info['versions'].get('torch')}, measured "
             f"{run_info['started']}. Each provider returns (logprob, entropy) per token at temperature "
             f"{TEMPERATURE}; the backward takes random upstream gradients of both. Time: "
             f"{run_info['time_metric']}. Memory: {run_info['memory_metric']}.", "",
             "| head | tokens | dtype | mode | provider | ms median | peak MB | logprob / entropy / d(hidden) / "
             "d(weight) rel err vs float64 | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["records"]:
        ms, peak, errs, status = case_plots.record_cells(r, ("logprob_rel_err", "entropy_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err"))
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['dtype']} | {r['mode']} | {r['provider']} | {ms} | "
                     f"{peak} | {errs} | {status} |")
    if data.get("device_kind") == "cpu":
        lines += ["", "CPU run: dft-ops runs its PyTorch backend here (the Triton kernels need a GPU): its peak is a "
                      "few (1024 tokens x 8192 vocabulary) fp32 blocks, as large as the whole logits up to 1024 "
                      "tokens of a small vocabulary; past that the materialized providers grow with tokens x "
                      "vocabulary and it does not. Times are CPU times, not the GPU kernels'."]
    if plot is not None:
        lines += ["", f"![time and memory]({plot.name})"]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> Path | None:
    return case_plots.plot_time_and_memory(data, path, list(PROVIDERS), ("shape", "dtype"),
                                           lambda g: f"{g[0]}, {g[1]}", "Per-token log-probs + entropy, forward+backward,")


def write_reports(out: Path, stem: str, data: dict, plots: bool = True) -> list[Path]:
    """``<stem>.md`` and (``plots``) ``<stem>-fwd-bwd.png`` from the merged results."""
    return case_plots.write_reports(out, stem, data, markdown, plot, plots)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.token_logprobs", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"))
    p.add_argument("--shapes", nargs="+", help="heads: presets or DxV (default: llama3-8b qwen2.5-7b on GPU, tiny "
                                                "on CPU)")
    p.add_argument("--tokens", nargs="+", type=parse_tokens, help="default: 4k 16k on GPU, 256 1024 4096 on CPU")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["forward+backward"])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--out", type=Path, default=SCRATCH_DIR)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    meter = measure.GpuMeter(device) if gpu else measure.CpuMeter(max_runs=5, rep_ms=500)
    heads = args.shapes or (["llama3-8b", "qwen2.5-7b"] if gpu else ["tiny"])
    for head in heads:
        parse_head(head)  # a bad name fails before anything runs
    tokens = args.tokens or ([4 * 1024, 16 * 1024] if gpu else [256, 1024, 4096])
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"token log-probs benchmark on {meter.name()}: {heads} x {tokens} tokens, {dtype_name(dtype)}, "
          f"{args.modes}", flush=True)
    run_info = {"started": started, "argv": " ".join(["python -m bench.token_logprobs", *(argv or sys.argv[1:])]),
                "device": meter.name(), "device_kind": meter.kind, "versions": versions(), "commit": git_commit(),
                "time_metric": meter.time_metric, "memory_metric": meter.memory_metric,
                "threads": torch.get_num_threads()}
    stem = slug(meter.name()) + "-token-logprobs"
    records = run(heads, tokens, dtype, args.modes, meter, args.providers, log=lambda line: print(line, flush=True),
                  emit=lambda recs: merge(args.out / f"{stem}.json", recs, run_info))
    data = merge(args.out / f"{stem}.json", records, run_info)
    written = write_reports(args.out, stem, data, not args.no_plot)
    print(f"wrote {args.out / stem}.json, " + ", ".join(str(p) for p in written))
    bad = [r for r in records if r["status"] == "ok" and (r.get("check") or {}).get("ok") is False]
    for r in bad:
        print(f"MISMATCH vs float64: {r['provider']} {r['shape']} N={r['tokens']}: {r['check']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
