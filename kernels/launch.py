"""Launch plumbing shared by the kernels: tile configurations and a small tuner.

A :class:`Launch` is everything needed to run (or only compile) one kernel:
the @triton.jit function, its arguments and the constexpr flags that do not
depend on the tile configuration. Keeping it as data lets the compile checks
in tests/ build exactly the launch the library would run, for a GPU target,
on a machine without one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from dft_ops.backends.protocol import GradTerms, Head, Tokens, interpreting


def family(dtype: torch.dtype) -> str:
    """Tile-configuration family of a compute dtype: fp32 dots (tf32x3) need smaller tiles."""
    return "fp32" if dtype == torch.float32 else "16bit"


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def torch_to_tl(dtype: torch.dtype):
    """The Triton dtype of a floating torch dtype (a constexpr kernel argument)."""
    return _TL_DTYPES[dtype]


@dataclass(frozen=True)
class Config:
    """One tile configuration: block sizes (constexprs), warps, pipeline stages.

    ``min_arch``: the smallest compute capability (major * 10 + minor) it is
    offered on; tiles that only fit Hopper's register file and shared memory
    say 90 (tests/compile_check.py applies the no-spill rule per target).
    """

    blocks: dict[str, int]
    num_warps: int = 4
    num_stages: int = 3
    min_arch: int = 0

    def kwargs(self) -> dict[str, int]:
        return {**self.blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        b = ",".join(f"{k}={v}" for k, v in self.blocks.items())
        return f"{b},w{self.num_warps},s{self.num_stages}" + (f",sm{self.min_arch}+" if self.min_arch else "")


@dataclass
class Launch:
    """A kernel with its runtime arguments; ``grid(config)`` gives the launch grid."""

    kernel: Any
    args: dict[str, Any]
    constexprs: dict[str, Any]
    grid: Callable[[Config], tuple[int, ...]]
    # constexprs that depend on the tile sizes (e.g. EVEN_D = D % BLOCK_D == 0); may
    # also adjust a block size of the config to the problem
    per_config: Callable[[Config], dict[str, Any]] = lambda config: {}
    # tensors the kernel adds into: the tuner zeroes them after its trials, so a launch
    # is tuned only while they are still zero (before accumulation starts)
    accumulators: list[torch.Tensor] = field(default_factory=list)
    # which list of tile configurations applies: "16bit" (bf16/fp16) or "fp32"
    family: str = "16bit"

    def kwargs(self, config: Config) -> dict[str, Any]:
        """Every keyword argument of the kernel call for ``config``."""
        return {**self.args, **self.constexprs, **config.kwargs(), **self.per_config(config)}

    def run(self, config: Config) -> None:
        self.kernel[self.grid(config)](**self.kwargs(config))

    @property
    def device(self) -> torch.device:
        return next(t.device for t in self.args.values() if isinstance(t, torch.Tensor))


def device_arch(device: torch.device) -> int:
    """Compute capability as major * 10 + minor (90 for H100); 0 off CUDA."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


class Tuner:
    """Picks the fastest configuration per key by timing each on the GPU, once per process.

    The key is the caller's (every size and feature the best tiles depend on)
    plus the configuration family and the GPU's architecture; configurations
    whose ``min_arch`` the GPU does not reach are never tried. Trials run on the
    launch's real buffers: kernels that only write (the forward, the logit
    gradient) need nothing more; a launch with ``accumulators`` must be tuned
    before accumulation starts (they are zero), and they are zeroed after the
    trials - no copy of them is ever made. ``DFT_OPS_CONFIG=i`` forces the i-th
    allowed configuration (bench/, debugging). Under the interpreter it always
    returns ``interpret_config``.
    """

    def __init__(self, configs: dict[str, list[Config]], interpret_config: Config):
        self.configs = configs
        self.interpret_config = interpret_config
        self.best: dict[tuple, Config] = {}

    def allowed(self, family: str, arch: int) -> list[Config]:
        return [c for c in self.configs[family] if c.min_arch <= arch]

    def pick(self, launch: Launch, key: tuple) -> Config:
        if interpreting():
            return self.interpret_config
        arch = device_arch(launch.device)
        configs = self.allowed(launch.family, arch)
        forced = os.environ.get("DFT_OPS_CONFIG")
        if forced is not None:
            return configs[int(forced) % len(configs)]
        key = (launch.family, arch, *key)
        if key not in self.best:
            if len(configs) == 1:
                self.best[key] = configs[0]
            else:
                self.best[key] = min(configs, key=lambda c: self._time(launch, c))
                for t in launch.accumulators:
                    t.zero_()
        return self.best[key]

    def run(self, launch: Launch, key: tuple) -> Config:
        config = self.pick(launch, key)
        launch.run(config)
        return config

    @staticmethod
    def _time(launch: Launch, config: Config) -> float:
        from triton.testing import do_bench

        try:
            return do_bench(lambda: launch.run(config), warmup=5, rep=20, return_mode="median")
        except triton.runtime.errors.OutOfResources:
            return float("inf")


def kernel_operands(hidden, head: Head, tokens: Tokens, terms: GradTerms | None = None, *, class_weight: bool,
                    second: bool) -> tuple[torch.Tensor, Head, Tokens, GradTerms | None]:
    """A call's operands as the kernels read them (M > 0): (hidden, head, tokens, terms).

    - (M,) / (V,) vectors with unit stride (a caller's view such as labels[:, 0]
      or an expanded bias is copied, which costs nothing next to the products),
      targets clamped to [-1, V] so a label outside [0, V) stays outside after
      the kernels' int32 cast (2**32 + 5 would otherwise read as 5); per-token
      inverse temperatures fp32;
    - matrices with unit column stride: kernels address element (i, k) as
      ``i * stride(0)`` in int64 plus ``k * stride(1)`` in int32 (int64 column
      offsets cost the registers the largest tiles need), so a column-major
      operand (a ``.T`` view) is copied once rather than wrapping at 2^31;
    - terms fp32 and contiguous;
    - what the launch does not read dropped first, so it is never copied: the
      class weights unless ``class_weight``, the second head unless ``second``.
    """
    def unit(matrix):
        return matrix if matrix.stride(1) == 1 else matrix.contiguous()

    V = head.weight.shape[0]
    inv_t = tokens.inv_temperature
    tokens = Tokens(tokens.targets.clamp(-1, V).contiguous(),
                    tokens.rows.contiguous() if tokens.rows is not None else None,
                    inv_t.to(torch.float32).contiguous() if inv_t is not None else None)
    two = head.second if second else None
    if two is not None:
        two = two._replace(hidden=unit(two.hidden), weight=unit(two.weight))
    head = head._replace(weight=unit(head.weight), bias=head.bias.contiguous() if head.bias is not None else None,
                         class_weight=head.class_weight.contiguous() if class_weight and head.class_weight is not None
                         else None, second=two)
    if terms is not None:
        terms = GradTerms(*(t.to(torch.float32).contiguous() if t is not None else None for t in terms))
    return unit(hidden), head, tokens, terms


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bucket(n: int) -> int:
    """Size class of a token count for tuning keys (a power of two: 64k and 128k differ, 100k and 128k do not)."""
    return next_power_of_2(n)


def round_down(n: int, multiple: int) -> int:
    """n rounded down to a multiple (at least one multiple)."""
    return max(multiple, n // multiple * multiple)


MAX_SPLITS = 32  # partials per token: (splits, M) floats each


def forward_splits(config: Config, n_tokens: int, vocab: int, sms: int) -> int:
    """How many vocabulary slices the forward splits over (>= 1), for this configuration's tiles.

    Each program streams vocab / splits rows, so a launch takes about
    waves / splits time units, waves = ceil(token tiles x splits / SMs) (one
    program per SM at these tile sizes): whole waves. The smallest count within
    5% of the best (more slices only shave a partial last wave); each slice
    keeps at least 8 tiles, and at most MAX_SPLITS slices.
    """
    token_tiles = triton.cdiv(n_tokens, config.blocks["BLOCK_N"])
    most = max(1, min(MAX_SPLITS, triton.cdiv(vocab, config.blocks["BLOCK_V"]) // 8))
    cost = {s: triton.cdiv(token_tiles * s, sms) / s for s in range(1, most + 1)}
    best = min(cost.values())
    return min(s for s, c in cost.items() if c <= 1.05 * best)
