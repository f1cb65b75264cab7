"""``python -m bench``: the command line (see ``--help``)."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from . import goals, measure, report
from .cases import (CPU_GOAL, DTYPES, HEADS, INPUT_KINDS, MODES, OBJECTIVES, SUITES, WORKSPACE_SWEEP_MB, Group,
                    expand, parse_head, parse_tokens)
from .environment import RESULTS_DIR, SCRATCH_DIR, git_commit, slug, versions
from .providers import PROVIDERS, dft_ops_workspace_provider
from .run import Session, run_case

EPILOG = """
results go to a scratch folder (--out, default {scratch}); the tracked results change only with
--out docs/benchmarks.

suites: cpu   - the tiny head, 256/1k/2k tokens, every mode (the default without a GPU; minutes)
        gpu   - the goal cases, then the four real heads at 1k..64k tokens forward+backward,
                forward and backward at 4k/16k, then 128k (the default with a GPU; use --time-budget)
        goals - only what --goals reads, DFT first: llama3-8b @16k, gemma2-2b @8k (all providers), qwen2.5-7b
                @128k (every provider that does not materialize logits); a GPU window's headline
        workspace - the "gemm" backward at each --workspace-sweep size (what --workspace-sweep runs by default)
        cpu-goal - N=4096, D=1024, V=32000 fp32 forward+backward, dft-ops and every CPU peer, against the
                three products' time measured in the same run; ends with the CPU goal lines
--shapes/--tokens replace the suite's heads and token counts; --objectives/--modes filter it.

examples:
  python -m bench                                   # CPU: tiny preset; GPU: the full sweep
  python -m bench --suite goals && python -m bench --goals
  python -m bench --shapes llama3-8b --tokens 4k 16k --modes forward+backward --providers liger dft-ops
  python -m bench --workspace-sweep 32 128 512 --shapes llama3-8b --tokens 16k   # GPU: memory vs time
  python -m bench --out docs/benchmarks             # update the tracked results
""".format(scratch=SCRATCH_DIR)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=(
        "Memory and throughput of dft-ops against standard cross-entropy and its peers, on the same inputs "
        "in one process. Writes <out>/<device>.json, .md and PNG plots."),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), help="preset list of cases (default: gpu with CUDA, else cpu)")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="NAME",
                   help=f"providers to run (default: all): {', '.join(PROVIDERS)}")
    p.add_argument("--shapes", nargs="+", type=parse_head, metavar="HEAD",
                   help=f"heads: presets {', '.join(f'{h.name} (D{h.hidden}/V{h.vocab})' for h in HEADS.values())}, "
                        "or DxV")
    p.add_argument("--tokens", nargs="+", type=parse_tokens, metavar="N", help="token counts, e.g. 1k 4k 16k 128k")
    p.add_argument("--dtype", choices=list(DTYPES), help="input dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, help="ce and/or dft (default: both)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="passes to time (default: the suite's)")
    p.add_argument("--inputs", nargs="+", choices=INPUT_KINDS, default=["peaked"],
                   help="random (flat softmax) and/or peaked (hidden states correlated with the label rows); "
                        "default peaked")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--out", type=Path, default=SCRATCH_DIR,
                   help=f"results folder (default {SCRATCH_DIR}; {RESULTS_DIR.relative_to(RESULTS_DIR.parents[1])} "
                        "holds the tracked ones)")
    p.add_argument("--workspace-sweep", nargs="*", type=float, metavar="MB",
                   help="time and peak memory of the 'gemm' backward at each workspace size in MiB (default "
                        f"{' '.join(f'{mb:g}' for mb in WORKSPACE_SWEEP_MB)}): <out>/<device>-workspace.*")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no provider or timed run after this many seconds; every result is written as it is "
                        "measured")
    p.add_argument("--previous", type=Path, metavar="DIR",
                   help="start from the results of this device in DIR (e.g. docs/benchmarks): this run's records "
                        "replace theirs case by case, the rest are kept")
    p.add_argument("--no-check", action="store_true",
                   help="skip the correctness checks (against float64, and against dft-ops)")
    p.add_argument("--check-only", action="store_true", help="only the correctness check: no timing or memory")
    p.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    p.add_argument("--warmup-ms", type=float, default=25, help="GPU: warm-up time (at least one run)")
    p.add_argument("--rep-ms", type=float, help="time per measurement (GPU default 100 ms, CPU 500 ms)")
    p.add_argument("--min-runs", type=int, help="fewest timed runs per measurement (GPU default 5, CPU 3)")
    p.add_argument("--max-runs", type=int, help="most timed runs per measurement (GPU default 100, CPU 7)")
    p.add_argument("--goals", action="store_true",
                   help="print the goal lines from the GPU results in --out and exit (measure them with --suite goals)")
    p.add_argument("--report", action="store_true", help="rebuild the Markdown and plots from the JSON in --out")
    p.add_argument("--list", action="store_true", help="list providers and whether they can run here")
    p.add_argument("--interpret", action="store_true",
                   help="CPU only: run the Triton providers (Liger, dft-ops' Triton backend) under TRITON_INTERPRET=1 "
                        "to check them without a GPU (implies --check-only; results go to <cpu>-interpret.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.interpret and device.type == "cpu" and os.environ.pop("TRITON_INTERPRET", "0") == "1":
        print("note: TRITON_INTERPRET=1 from the environment is ignored here; --interpret asks for it", flush=True)
    if args.interpret:
        if device.type == "cuda":
            print("--interpret is for machines without a GPU (add --device cpu)", file=sys.stderr)
            return 2
        # read when @triton.jit decorates a kernel: before Liger or dft_ops.kernels are imported
        os.environ["TRITON_INTERPRET"] = "1"
        args.check_only = True
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if args.goals:
        print(goals.report(args.out))
        print()
        print(goals.cpu_report(args.out))
        return 0
    if args.report:
        return _rebuild_reports(args.out, not args.no_plots)
    meter = _meter(device, args)
    stem = slug(meter.name()) + ("-interpret" if args.interpret else "")
    if args.list:
        for name, p in PROVIDERS.items():
            why = p.unavailable(device)
            print(f"{name:14s} {p.description:55s} {'runs here' if why is None else 'skipped: ' + why}")
        return 0

    sweep = args.workspace_sweep
    if sweep is not None:
        sweep = sweep or list(WORKSPACE_SWEEP_MB)
        if any(mb <= 0 for mb in sweep):
            print("--workspace-sweep: sizes must be positive MiB", file=sys.stderr)
            return 2
        sweep_providers = [dft_ops_workspace_provider(mb) for mb in sweep]
        for provider in sweep_providers:
            PROVIDERS[provider.name] = provider
        stem += "-workspace"
    suite = args.suite or ("workspace" if sweep is not None else "gpu" if device.type == "cuda" else "cpu")
    groups = SUITES[suite]
    if args.shapes or args.tokens:
        groups = [Group(tuple(h.name if h.name in HEADS else f"{h.hidden}x{h.vocab}" for h in args.shapes)
                        if args.shapes else tuple(dict.fromkeys(h for g in groups for h in g.heads)),
                        tuple(args.tokens) if args.tokens else tuple(sorted({n for g in groups for n in g.tokens})),
                        modes=tuple(args.modes or (("backward",) if sweep is not None else MODES)))]
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cases = []
    for case in expand(groups, args.inputs, dtype):
        if args.objectives and case.objective not in args.objectives:
            continue
        if args.modes:
            case.modes = tuple(m for m in case.modes if m in args.modes)
        if case.modes:
            cases.append(case)
    if sweep is not None:
        providers = [p.name for p in sweep_providers]
    else:
        # in the table's order whatever the command line's: dft-ops first (the others' agreement check)
        providers = [p for p in PROVIDERS if "@" not in p and (not args.providers or p in args.providers)]

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"dft-ops benchmark on {meter.name()} ({device.type}), suite {suite}, {len(cases)} cases, "
          f"providers: {', '.join(providers)}", flush=True)
    if device.type == "cpu":
        print(f"  CPU run: wall/CPU time and peak RSS on {torch.get_num_threads()} threads; "
              "not the GPU kernels' performance", flush=True)
    if args.interpret:
        print("  Triton kernels on the interpreter: a correctness check; the times mean nothing", flush=True)
    for name in providers:
        why = PROVIDERS[name].unavailable(device)
        if why:
            print(f"  skipped {name}: {why}", flush=True)
    gemm, gemm_note = (None, "not measured (--check-only)") if args.check_only else meter.gemm_tflops(dtype)
    if gemm is not None:
        print(f"  GEMM yardstick: {gemm:.2f} TFLOP/s ({gemm_note}, {args.dtype or _dtype_name(dtype)})", flush=True)

    env = {"device": meter.name(), "device_kind": meter.kind, "versions": versions(), "commit": git_commit(),
           "gemm_tflops": gemm, "measured_at": started, "triton_interpret": bool(args.interpret)}
    run_info = {"started": started, "argv": " ".join(["python -m bench", shlex.join(argv if argv is not None else sys.argv[1:])]).strip(),
                "suite": suite, "device": env["device"], "device_kind": meter.kind, "versions": env["versions"],
                "commit": env["commit"], "gemm_tflops": gemm, "gemm_note": gemm_note, "gemm_dtype": _dtype_name(dtype),
                "memory_metric": meter.memory_metric, "time_metric": meter.time_metric,
                "threads": torch.get_num_threads(), "triton_interpret": bool(args.interpret), "not_run": []}
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    if args.check_only and args.no_check:
        print("--check-only and --no-check leave nothing to do", file=sys.stderr)
        return 2
    session = Session(meter=meter, env=env, providers=providers, check=not args.no_check,
                      check_only=args.check_only, deadline=deadline, log=lambda line: print(line, flush=True))
    json_path = args.out / f"{stem}.json"
    if args.previous is not None and (args.previous / json_path.name).exists() and not json_path.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        json_path.write_text((args.previous / json_path.name).read_text())
        print(f"  starting from {args.previous / json_path.name}", flush=True)
    records = []

    def emit(new_records):
        """Every provider's records go to disk as soon as they exist: a cut run keeps what it measured."""
        records.extend(new_records)
        data = report.merge(json_path, records, run_info)
        report.write_markdown(args.out / f"{stem}.md", data, sorted(args.out.glob(f"{stem}-*.png")))

    session.emit = emit
    floor_case = next((c for c in cases if c.head.name == CPU_GOAL[0] and c.tokens == CPU_GOAL[1]), None)
    if floor_case is not None and not args.check_only:
        # the CPU goal's yardstick, measured in this run with the same meter: the three products of its shapes
        run_info["three_products"] = measure.three_products(meter, floor_case.tokens, floor_case.head.hidden,
                                                            floor_case.head.vocab, dtype, deadline)
        print(f"  three products of N={floor_case.tokens}, D={floor_case.head.hidden}, V={floor_case.head.vocab}: "
              f"{run_info['three_products']['ms_median']:.0f} ms (median)", flush=True)
    t0 = time.monotonic()
    for i, case in enumerate(cases, 1):
        if session.out_of_time():
            run_info["not_run"] = [str(c) for c in cases[i - 1:] if session.todo(c)]
            print(f"time budget used up: {len(run_info['not_run'])} case(s) not run", flush=True)
            break
        if not session.todo(case):
            continue  # listed earlier in the suite with these modes and providers
        print(f"[{i}/{len(cases)}] {case}  ({time.monotonic() - t0:.0f} s)", flush=True)
        run_case(case, session)
    data = report.merge(json_path, records, run_info)
    plots = [] if args.no_plots else (report.write_workspace_plots if sweep is not None else report.write_plots)(
        args.out, stem, data)
    report.write_markdown(args.out / f"{stem}.md", data, plots or sorted(args.out.glob(f"{stem}-*.png")))

    skipped = report.skipped_providers(records)
    shown = [r for r in records if r["provider"] not in skipped]
    header, rows = report.result_rows(shown, meter.kind == "cpu")
    print()
    print(report.text_table(header, rows))
    if report.backward_in_forward(shown):
        print(report.BACKWARD_IN_FORWARD_NOTE.replace("`", ""))
    summary = report.summary_lines(shown)
    if summary:
        print("\nSummary, forward+backward: dft-ops against the fastest peer")
        for line in summary:
            print(f"  {line}")
    for p, reason in skipped.items():
        print(f"skipped {p}: {reason}")
    mismatches = sorted({(r["provider"], r["shape"], r["tokens"], r["objective"]) for r in records
                         if (r.get("check") or {}).get("ok") is False})
    for p, shape, n, obj in mismatches:
        print(f"MISMATCH vs float64: {p} on {shape} N={n} {obj} (see the correctness table)")
    print(f"\nwrote {json_path}, {json_path.with_suffix('.md')}" + (f" and {len(plots)} plot(s)" if plots else "")
          + f" in {time.monotonic() - t0:.0f} s")
    if suite == "goals" or (meter.kind == "cuda" and suite == "gpu"):
        print()
        print(goals.report(args.out))
    if floor_case is not None:
        print()
        print(goals.cpu_report(args.out))
    return 0


def _dtype_name(dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _meter(device: torch.device, args):
    from .measure import CpuMeter, GpuMeter

    if device.type == "cuda":
        return GpuMeter(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms or 100, min_runs=args.min_runs or 5,
                        max_runs=args.max_runs or 100)
    return CpuMeter(min_runs=args.min_runs or 3, max_runs=args.max_runs or 7, rep_ms=args.rep_ms or 500)


def _rebuild_reports(out: Path, plots: bool) -> int:
    """Markdown and plots again from every result file in ``out`` (any device)."""
    paths = [p for p in sorted(out.glob("*.json")) if "records" in report.load(p)]
    if not paths:
        print(f"--report: no result file in {out}", file=sys.stderr)
        return 2
    for path in paths:
        data = report.load(path)
        if path.stem.endswith("-asft"):  # the ASFT case's own tables and plot
            from . import asft

            print(f"rebuilt {', '.join(str(p) for p in asft.write_reports(out, path.stem, data, plots))}")
            continue
        if path.stem.endswith("-token-logprobs"):  # the RL case's own table and plot
            from . import token_logprobs

            written = token_logprobs.write_reports(out, path.stem, data, plots)
            print(f"rebuilt {', '.join(str(p) for p in written)}")
            continue
        if path.stem.endswith("-distill"):  # the distillation case's own table (no plot)
            from . import distill

            path.with_suffix(".md").write_text(distill.markdown(data))
            print(f"rebuilt {path.with_suffix('.md')}")
            continue
        writer = report.write_workspace_plots if path.stem.endswith("-workspace") else report.write_plots
        pngs = writer(out, path.stem, data) if plots else sorted(out.glob(f"{path.stem}-*.png"))
        report.write_markdown(path.with_suffix(".md"), data, pngs)
        print(f"rebuilt {path.with_suffix('.md')} and {len(pngs)} plot(s)")
    return 0
