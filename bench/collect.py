"""``python -m bench.collect DIR [DIR ...]``: a GPU window's returned files into docs/benchmarks, named by GPU.

Each DIR is what one device call returned (its ``$OUT``: the device tool's ``files_at``). Files whose
name says nothing of the GPU get its slug as a prefix (``smoke.json`` -> ``nvidia-h200-smoke.json``,
``goals.txt`` -> ``nvidia-h200-goals.txt``, the logs likewise); the benchmark's own ``<gpu>.json`` (already
merged with the committed results by ``--previous``) replaces the committed one; then its Markdown and
plots are rebuilt from the JSON. Prints what it wrote; commit those.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .environment import RESULTS_DIR, slug

RENAMED = ("smoke.json", "smoke.md", "probe.json", "goals.txt", "gpu-tests.log", "gpu-tests.xml",
           "gpu-tests-rest.log", "gpu-tests-rest.xml")


def gpu_name(dirs: list[Path]) -> str:
    for d in dirs:
        for p in sorted(d.glob("*.json")):
            try:
                data = json.loads(p.read_text())
            except ValueError:
                continue
            name = data.get("device") or (data.get("gpu") or {}).get("name")
            if name and data.get("device_kind", "cuda") == "cuda":
                return name
    raise SystemExit(f"no GPU result in {', '.join(map(str, dirs))}: nothing says which GPU measured it")


def collect(dirs: list[Path], out: Path = RESULTS_DIR, plots: bool = True) -> list[Path]:
    stem = slug(gpu_name(dirs))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for d in dirs:
        call = "call2" if any(d.glob(f"{stem}*.json")) else "call1"
        for p in sorted(d.iterdir()):
            if not p.is_file():
                continue
            if p.name in RENAMED:
                target = out / f"{stem}-{p.name}"
            elif p.name == "gpu_run.log":
                target = out / f"{stem}-{call}.log"
            elif p.name.startswith(stem):
                target = out / p.name
            else:
                continue
            shutil.copyfile(p, target)
            written.append(target)
    from . import report

    main_json = out / f"{stem}.json"
    if main_json.exists():  # the benchmark's tables and plots, from the merged JSON
        data = report.load(main_json)
        pngs = report.write_plots(out, stem, data) if plots else sorted(out.glob(f"{stem}-*.png"))
        report.write_markdown(main_json.with_suffix(".md"), data, pngs)
        written += [main_json.with_suffix(".md"), *pngs]
        goals_txt = out / f"{stem}-goals.txt"
        if goals_txt not in written:  # call2 was cut before its goal lines: the same lines from the JSON
            from . import goals

            goals_txt.write_text(goals.report(out) + "\n")
            written.append(goals_txt)
    return sorted(set(written))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="the folders the device calls returned")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"default {RESULTS_DIR}")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    for path in collect(args.dirs, args.out, not args.no_plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
