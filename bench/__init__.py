"""Benchmarks of dft-ops against standard cross-entropy and its peers (run ``python -m bench``).

Every provider (plain PyTorch, torch.compile, PyTorch's chunked
``F.linear_cross_entropy``, Liger-Kernel, Cut Cross-Entropy, TRL's fused LM
head, dft-ops) is run on the same inputs in one process: first checked
against a float64 reference (:mod:`bench.reference`) and against dft-ops,
then timed and its peak memory taken. Results go to
``<out>/<device>.json`` with a Markdown table and PNG plots (``--out``: a scratch
folder by default; ``docs/benchmarks`` holds the tracked results).

Modules: :mod:`bench.cases` (heads, suites, inputs), :mod:`bench.providers`,
:mod:`bench.measure` (timers, memory, the correctness check),
:mod:`bench.report` (JSON, Markdown, plots), :mod:`bench.goals`,
:mod:`bench.cli` (the command line). ``bench/test_kernels.py`` is a
pytest-benchmark suite of the dft-ops passes; ``bench/gpu_run.sh`` the two
calls of a GPU window (:mod:`bench.probe`, :mod:`bench.smoke`, then the
benchmark; :mod:`bench.collect` commits what they return). (``python -m bench.objectives``, the label-probability
histograms of the objectives, lives here too.)
"""
