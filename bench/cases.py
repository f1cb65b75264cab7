"""What is measured: output heads of real models, token counts, suites, and the inputs.

A *case* is one head x token count x objective x input kind x dtype: one set
of inputs on which every provider is checked, then timed in each mode.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

MODES = ("forward", "backward", "forward+backward")
OBJECTIVES = ("ce", "dft")
INPUT_KINDS = ("random", "peaked")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Head:
    """An LM head: hidden size D and vocabulary size V (weight is V x D)."""

    name: str
    hidden: int
    vocab: int


HEADS = {h.name: h for h in (
    Head("llama3-8b", 4096, 128256),
    Head("qwen2.5-7b", 3584, 152064),
    Head("gemma2-2b", 2304, 256000),
    Head("qwen2.5-0.5b", 896, 151936),
    # CPU-sized, deliberately not a multiple of the usual tile sizes
    Head("tiny", 256, 10000),
    # the CPU goal's head (issue 16): the one-pass head against the three products' time on this CPU
    Head("cpu-goal", 1024, 32000),
    # the published anchors of issue 16 at D 4096: materialized PyTorch (59 ms on an H100) and a Hopper
    # CuTe fused head (50.4 ms) at 8k tokens
    Head("4096x151936", 4096, 151936),
    Head("4096x131072", 4096, 131072),
)}


def parse_head(text: str) -> Head:
    """A preset name, or ``DxV`` (e.g. ``4096x128256``) for any other head."""
    if text in HEADS:
        return HEADS[text]
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise ValueError(f"shape: {text!r} is neither a preset ({', '.join(HEADS)}) nor DxV like 4096x128256")
    return Head(text, int(m.group(1)), int(m.group(2)))


def parse_tokens(text: str) -> int:
    """``4096``, ``4k`` (= 4096) or ``128k``."""
    m = re.fullmatch(r"(\d+)([kK]?)", text)
    if not m:
        raise ValueError(f"tokens: {text!r} is not a count like 4096 or 16k")
    n = int(m.group(1)) * (1024 if m.group(2) else 1)
    if n < 1:
        raise ValueError(f"tokens: must be positive, got {text!r}")
    return n


@dataclass(frozen=True)
class Group:
    """A block of cases: every head x tokens x objective, each in every mode, for these providers."""

    heads: tuple[str, ...]
    tokens: tuple[int, ...]
    objectives: tuple[str, ...] = OBJECTIVES
    modes: tuple[str, ...] = MODES
    # None: all the run's providers; "non-materializing": all but MATERIALIZING
    providers: tuple[str, ...] | str | None = None


K = 1024
GOAL_TOKENS = {"llama3-8b": 16 * K, "gemma2-2b": 8 * K}
LONG_CONTEXT = ("qwen2.5-7b", 128 * K)
# providers that materialize N x V logits (76 GB in fp32 at the long-context case): not run there
MATERIALIZING = ("torch", "torch-compile", "torch-lce")

# issue 16's anchors at 8k tokens (DFT and CE): dft-ops as shipped against materialized PyTorch and the peers
ANCHORS = {"4096x151936": 8 * K, "4096x131072": 8 * K}

# DFT first: the goal lines compare every peer on DFT and need CE of dft-ops only
_GOAL_GROUPS = [
    *(Group((head,), (n,), ("dft", "ce"), modes=("forward+backward",)) for head, n in GOAL_TOKENS.items()),
    Group((LONG_CONTEXT[0],), (LONG_CONTEXT[1],), ("dft",), ("forward+backward",), "non-materializing"),
    *(Group((head,), (n,), ("dft", "ce"), modes=("forward+backward",)) for head, n in ANCHORS.items()),
]
_REAL_HEADS = ("llama3-8b", "qwen2.5-7b", "gemma2-2b", "qwen2.5-0.5b")
CPU_GOAL = ("cpu-goal", 4 * 1024)
# the CPU goal's providers: dft-ops as shipped (its one-pass head on this backend), its two passes, and every
# peer with a CPU path (Liger is Triton-only; Cut Cross-Entropy runs its torch.compile implementation)
CPU_GOAL_PROVIDERS = ("dft-ops", "dft-ops-two-pass", "torch", "torch-compile", "torch-lce", "cce-exact", "trl")

# the "gemm" backward's workspace sizes of --workspace-sweep (MiB), and its cases: time and
# memory of the backward against the workspace, where it matters (long sequences, large heads)
WORKSPACE_SWEEP_MB = (16, 32, 64, 128, 256, 512, 1024, 2048)

SUITES: dict[str, list[Group]] = {
    # `make bench` without a GPU: every CPU-capable provider on the tiny head, in a few minutes
    "cpu": [Group(("tiny",), (256, 1024, 2048))],
    # the CPU goal (`make bench` without a GPU runs it after "cpu"): N=4096, D=1024, V=32000 fp32,
    # forward+backward, against the three products' time measured in the same run (python -m bench --goals)
    "cpu-goal": [Group((CPU_GOAL[0],), (CPU_GOAL[1],), ("dft", "ce"), ("forward+backward",), CPU_GOAL_PROVIDERS)],
    # exactly what `--goals` reads (bf16, forward+backward, peaked inputs), most wanted first: the
    # headline of a GPU window (bench/gpu_run.sh call2)
    "goals": _GOAL_GROUPS,
    # the GPU sweep, most wanted first (a time budget cuts it from the end): the goal cases,
    # then time and memory against tokens, then each pass alone, then 128k for everyone
    "gpu": [
        *_GOAL_GROUPS,
        Group(_REAL_HEADS, (1 * K, 4 * K, 16 * K, 64 * K), modes=("forward+backward",)),
        Group(_REAL_HEADS, (4 * K, 16 * K), modes=("forward", "backward")),
        Group(_REAL_HEADS, (128 * K,), modes=("forward+backward",)),
    ],
    # --workspace-sweep
    "workspace": [Group(("llama3-8b",), (16 * K,), ("dft",), ("backward",)),
                  Group(("qwen2.5-7b",), (64 * K,), ("dft",), ("backward",))],
}


@dataclass
class Case:
    head: Head
    tokens: int
    objective: str
    inputs: str
    dtype: torch.dtype
    modes: tuple[str, ...]
    providers: tuple[str, ...] | str | None = None
    key: tuple = field(init=False)

    def __post_init__(self):
        self.key = (self.head.name, self.tokens, self.objective, self.inputs, self.dtype)

    def runs(self, provider: str) -> bool:
        if self.providers is None:
            return True
        if self.providers == "non-materializing":
            return provider not in MATERIALIZING
        return provider in self.providers

    def __str__(self) -> str:
        return (f"{self.head.name} (D={self.head.hidden}, V={self.head.vocab}) N={self.tokens} "
                f"{self.objective} {dtype_name(self.dtype)} {self.inputs}")


def expand(groups: list[Group], input_kinds, dtype) -> list[Case]:
    """Groups -> cases, in order (a case may come again with other modes or providers: the runner
    measures each provider x mode of a case once)."""
    cases = []
    for g in groups:
        for head in g.heads:
            for n in g.tokens:
                for obj in g.objectives:
                    for kind in input_kinds:
                        cases.append(Case(parse_head(head), n, obj, kind, dtype, tuple(g.modes), g.providers))
    return cases


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclass
class Inputs:
    """hidden (N, D) and weight (V, D) in the case's dtype, labels (N,) int64, all on one device."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor

    def leaves(self):
        """Fresh leaf copies of hidden and weight that require grad (the inputs of one provider)."""
        return (self.hidden.detach().requires_grad_(), self.weight.detach().requires_grad_())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight, self.labels))


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """The case's inputs: the same for every provider.

    ``random``: hidden ~ N(0, 1), weight rows ~ N(0, 1/D), so logits ~ N(0, 1)
    and the softmax is flat - the worst case for gradient filtering.

    ``peaked``: each hidden state is pushed along its label's weight row so
    the label logit stands ``log V + 2.5 + 2 * N(0, 1)`` above the noise:
    ``p(label)`` is then spread over (0, 1) with a median near 0.9 and the
    rest of the softmax is tiny, as for a model that already fits its data.
    """
    D, V, N = case.head.hidden, case.head.vocab, case.tokens
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(V, D, generator=gen, device=device).div_(math.sqrt(D))
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    hidden = torch.randn(N, D, generator=gen, device=device)
    if case.inputs == "peaked":
        margin = math.log(V) + 2.5 + 2.0 * torch.randn(N, generator=gen, device=device)
        rows = weight[labels]
        hidden.addcmul_(rows, (margin / rows.square().sum(dim=1))[:, None])
        del rows
    elif case.inputs != "random":
        raise ValueError(f"inputs: {case.inputs!r} is not one of {INPUT_KINDS}")
    return Inputs(hidden.to(case.dtype), weight.to(case.dtype), labels)


def lower_bound_bytes(case: Case, mode: str) -> int:
    """Memory a loss step cannot avoid beyond its inputs: the gradients of hidden and weight.

    The O(N) per-token floats are left out (64 KiB at 16k tokens); forward alone needs nothing.
    """
    if mode == "forward":
        return 0
    item = torch.empty((), dtype=case.dtype).element_size()
    return (case.tokens + case.head.vocab) * case.head.hidden * item


def useful_flops(case: Case, mode: str) -> float:
    """The unavoidable GEMM work: 2NDV for the logits, 4NDV for d(hidden) and d(weight)."""
    ndv = float(case.tokens) * case.head.hidden * case.head.vocab
    return {"forward": 2 * ndv, "backward": 4 * ndv, "forward+backward": 6 * ndv}[mode]
