"""The distillation case: the generalized JSD to a teacher head of another size, fused vs Liger vs materialized.

    python -m bench.distill                   # GPU: llama3-8b student @ 16k tokens, bf16; CPU: tiny, fp32
    python -m bench.distill --shapes llama3-8b --tokens 4k 16k --beta 0.5 --out docs/benchmarks

Providers, on the same inputs (the student's head and hidden states, a teacher's of hidden size
``1.5 D`` whose logits are the student's plus noise, labels with a fifth ignored), each computing
the mean over the labeled tokens of the generalized JSD(beta) of the two tempered softmaxes
(Liger's ``LigerFusedLinearJSD`` semantics: no label term, no T^2) and the gradients of the
student's hidden states and head (the teacher gets none):

- ``dft-ops``: ``linear_cross_entropy(objective=Distill("jsd", beta, alpha=0, t_squared=False),
  second_head=SecondHead(teacher_h, teacher_w), temperature=T)``: the one-pass head (both heads'
  logits of a chunk of tokens in a bounded workspace, the mixture's KLs from a second read of it);
- ``liger``: Liger's ``LigerFusedLinearJSD(jsd_beta, temperature)``, Triton/CUDA only (on a CPU it
  is recorded as skipped, with the reason);
- ``liger-chunked``: Liger's ``LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1)``, its
  chunked PyTorch form (``torch.compile``d on a GPU, eager on a CPU, where it runs);
- ``torch``: both heads' logits materialized in fp32, TRL's / Liger's formula (log-softmaxes and the
  mixture's logsumexp).

On a CPU, dft-ops runs its PyTorch one-pass head (the Triton kernels need a GPU); the comparison there
is against materialized PyTorch and Liger's chunked form, and the times are CPU times. Time:
forward+backward (CUDA events, or CPU wall clock); memory: the peak over what was allocated before
the step. Each provider's loss and gradients are checked against ``torch`` in fp32.

Writes ``<device>-distill.json`` (merged across runs) and ``<device>-distill.md`` under ``--out``
(default: a scratch folder).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import measure
from .asft import case_setup, measure_provider, merge
from .cases import DTYPES, Case, dtype_name, make_inputs, parse_head, parse_tokens
from .environment import SCRATCH_DIR, slug

PROVIDERS = ("dft-ops", "liger", "liger-chunked", "torch")
TEACHER_WIDTH = 1.5  # the teacher's hidden size, in student hidden sizes
TEACHER_NOISE = 0.5  # relative size of the teacher's own part of the logits


def make_distill_inputs(head: str, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Student hidden (N, D), weight (V, D), labels (N,) with a fifth ignored, teacher hidden (N, D2) and
    weight (V, D2) with D2 = 1.5 D: the student's columns plus their own (logits r = z + noise)."""
    inputs = make_inputs(Case(parse_head(head), tokens, "ce", "peaked", dtype, ("forward+backward",)), device, seed)
    h, w, labels = inputs.hidden, inputs.weight, inputs.labels.clone()
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    extra = int(h.shape[1] * (TEACHER_WIDTH - 1))
    labels[torch.rand(labels.shape, generator=gen, device=device) < 0.2] = -100
    h_extra = torch.randn(h.shape[0], extra, generator=gen, device=device)
    w_extra = torch.randn(w.shape[0], extra, generator=gen, device=device) * (TEACHER_NOISE * w.float().std())
    return dict(hidden=h, weight=w, labels=labels, teacher_hidden=torch.cat([h.float(), h_extra], 1).to(dtype),
                teacher_weight=torch.cat([w.float(), w_extra], 1).to(dtype))


def torch_jsd(h, w, y, t_h, t_w, beta: float, temperature: float) -> Tensor:
    """Both heads' logits materialized in fp32; TRL's / Liger's generalized JSD, mean over labeled tokens."""
    log_p = F.log_softmax(F.linear(h, w).float() / temperature, -1)
    with torch.no_grad():
        log_q = F.log_softmax(F.linear(t_h, t_w).float() / temperature, -1)
    if beta == 0.0:
        per_token = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(1 - beta), log_q + math.log(beta)]), dim=0)
        per_token = (beta * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
                     + (1 - beta) * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1))
    valid = y != -100
    return torch.where(valid, per_token, 0.0).sum() / valid.sum().clamp(min=1)


def liger_jsd(h, w, y, t_h, t_w, beta: float, temperature: float) -> Tensor:
    if not h.is_cuda:
        raise RuntimeError("Liger's LigerFusedLinearJSD is Triton/CUDA only: not run on a CPU")
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)(h, w, t_h, t_w, y)


def liger_chunked_jsd(h, w, y, t_h, t_w, beta: float, temperature: float) -> Tensor:
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    return LigerFusedLinearJSDFunction.apply(h, w, t_h, t_w, y, None, None, 0.0, 1.0, beta, -100, temperature,
                                             h.is_cuda, 1024, False)


def dft_ops_jsd(h, w, y, t_h, t_w, beta: float, temperature: float) -> Tensor:
    import dft_ops

    distill = dft_ops.objectives.Distill("jsd", beta, alpha=0.0, t_squared=False)
    # as shipped: the Triton kernels on CUDA; on a CPU the PyTorch backend (also under TRITON_INTERPRET)
    return dft_ops.linear_cross_entropy(h, w, y, objective=distill, second_head=dft_ops.SecondHead(t_h, t_w),
                                        temperature=temperature, backend="auto" if h.is_cuda else "torch")


LOSSES = {"dft-ops": dft_ops_jsd, "liger": liger_jsd, "liger-chunked": liger_chunked_jsd, "torch": torch_jsd}


def run(heads, tokens, dtype, beta: float, temperature: float, meter, providers=PROVIDERS, log=print,
        emit=lambda records: None) -> list[dict]:
    """One record per head x tokens x provider: time, memory, and the check against ``torch`` in fp32."""
    device = meter.device
    records = []
    for head in heads:
        for n in tokens:
            inputs = make_distill_inputs(head, n, dtype, device)
            h, w, y, t_h, t_w = (inputs[k] for k in ("hidden", "weight", "labels", "teacher_hidden",
                                                      "teacher_weight"))
            try:  # the float reference: materialized fp32 logits of both heads
                reference, ref_error = measure.loss_and_grads(
                    lambda hh, ww, yy: torch_jsd(hh, ww, yy, t_h.float(), t_w.float(), beta, temperature),
                    h.float(), w.float(), y), None
            except Exception as exc:
                reference, ref_error = None, measure.brief(exc)
            for name in providers:
                rec = dict(provider=name, shape=head, hidden=h.shape[1], teacher_hidden=t_h.shape[1],
                           vocab=w.shape[0], tokens=n, dtype=dtype_name(dtype), beta=beta, temperature=temperature,
                           mode="forward+backward")
                fn = LOSSES[name]
                if name == "liger" and device.type != "cuda":  # not a failure: a provider this device cannot run
                    rec.update(status="skipped", reason="LigerFusedLinearJSD is Triton/CUDA only")
                    log(f"  {head} N={n} {name:14s} skipped: {rec['reason']}")
                else:
                    measure_provider(rec, lambda hh, ww: fn(hh, ww, y, t_h, t_w, beta, temperature), h, w,
                                     reference, ref_error, meter, log=log, label=f"{head} N={n} {name:14s}")
                records.append(rec)
                emit(records)
            del inputs, h, w, t_h, t_w, reference
            meter.cleanup()
    return records


def _key(r: dict) -> tuple:
    return (r["shape"], r["tokens"], r["dtype"], r["beta"], r["temperature"], r["provider"])


def _order(r: dict) -> tuple:
    return (r["shape"], r["dtype"], r["beta"], r["temperature"], r["tokens"], PROVIDERS.index(r["provider"]))


def markdown(data: dict) -> str:
    runs = data["runs"][-1]
    lines = [f"# Distillation benchmark: {data['device']}", "",
             f"Commit {runs['commit']}, {runs['versions'].get('torch')} torch, measured {runs['started']} "
             f"(`{runs['argv']}`). Loss: mean over the labeled tokens of the generalized JSD(beta) between the "
             f"student's and a teacher's (hidden size 1.5 D) tempered softmaxes; forward+backward. Time: "
             f"{runs['time_metric']}. Memory: {runs['memory_metric']}.", "",
             "| student head | D2 | tokens | dtype | beta | T | provider | ms median | peak MB | "
             "loss / d(hidden) / d(weight) rel err vs torch fp32 | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["records"]:
        c = r.get("check") or {}
        errs = " / ".join(f"{c[k]:.1e}" for k in ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err")
                          if k in c) or "-"
        if r["status"] == "ok":
            ms, peak = f"{r['ms_median']:.2f}", f"{r.get('peak_mb', math.nan):.1f}"
            ok = c.get("ok")
            status = "unchecked" if ok is None else "ok" if ok else "MISMATCH"
        else:
            ms, peak, status = "-", "-", f"{r['status']}: {r.get('reason', '')}".replace("|", "/")
        lines.append(f"| {r['shape']} | {r['teacher_hidden']} | {r['tokens']} | {r['dtype']} | {r['beta']} | "
                     f"{r['temperature']} | {r['provider']} | {ms} | {peak} | {errs} | {status} |")
    if data.get("device_kind") == "cpu":
        lines += ["", "CPU run: dft-ops runs its PyTorch one-pass head here (the Triton kernels need a GPU), and "
                      "Liger's fused JSD is Triton/CUDA only, so it is not measured: the comparison is against "
                      "materialized PyTorch and Liger's chunked (eager PyTorch) form. dft-ops' peak is a few "
                      "(256 tokens x V) fp32 workspaces per head plus the fp32 d(weight); the materialized "
                      "providers grow with tokens x vocabulary. Times are CPU times, not the GPU kernels'."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"))
    p.add_argument("--shapes", nargs="+", help="student heads: presets or DxV (default: llama3-8b on GPU, tiny "
                                               "on CPU)")
    p.add_argument("--tokens", nargs="+", type=parse_tokens, help="default: 4k 16k on GPU, 256 1024 4096 on CPU")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--out", type=Path, default=SCRATCH_DIR)
    args = p.parse_args(argv)
    setup = case_setup(args, argv, "python -m bench.distill", gpu_tokens=[4096, 16 * 1024])
    if setup is None:
        return 2
    meter, heads, tokens, dtype, run_info = setup
    print(f"distillation benchmark on {meter.name()}: {heads} x {tokens} tokens, {dtype_name(dtype)}, "
          f"JSD beta {args.beta}, T {args.temperature}", flush=True)
    stem = slug(meter.name()) + "-distill"
    path = args.out / f"{stem}.json"
    records = run(heads, tokens, dtype, args.beta, args.temperature, meter, args.providers,
                  log=lambda line: print(line, flush=True),
                  emit=lambda recs: merge(path, recs, run_info, key=_key, order=_order))
    data = merge(path, records, run_info, key=_key, order=_order)
    (args.out / f"{stem}.md").write_text(markdown(data))
    print(f"wrote {path}, {args.out / stem}.md")
    bad = [r for r in records if r["status"] == "ok" and (r.get("check") or {}).get("ok") is False]
    for r in bad:
        print(f"MISMATCH vs torch fp32: {r['provider']} {r['shape']} N={r['tokens']}: {r['check']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
