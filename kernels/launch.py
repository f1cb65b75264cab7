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


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def family(dtype: torch.dtype) -> str:
    """Tile-configuration family of a compute dtype: fp32 dots (tf32x3) need smaller tiles."""
    return "fp32" if dtype == torch.float32 else "16bit"


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def torch_to_tl(dtype: torch.dtype):
    """The Triton dtype of a floating torch dtype (a constexpr kernel argument)."""
    return _TL_DTYPES[dtype]


@dataclass(frozen=True)
class Config:
    """One tile configuration: block sizes (constexprs) plus warps and pipeline stages."""

    blocks: dict[str, int]
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict[str, int]:
        return {**self.blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        b = ",".join(f"{k}={v}" for k, v in self.blocks.items())
        return f"{b},w{self.num_warps},s{self.num_stages}"


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
    # tensors the kernel adds into: restored after tuning trials
    accumulators: list[torch.Tensor] = field(default_factory=list)
    # which list of tile configurations applies: "16bit" (bf16/fp16) or "fp32"
    family: str = "16bit"

    def kwargs(self, config: Config) -> dict[str, Any]:
        """Every keyword argument of the kernel call for ``config``."""
        return {**self.args, **self.constexprs, **config.kwargs(), **self.per_config(config)}

    def run(self, config: Config) -> None:
        self.kernel[self.grid(config)](**self.kwargs(config))


class Tuner:
    """Picks the fastest configuration per key by timing each once on the GPU.

    Kernels that accumulate with atomics (the backward) cannot be re-run on
    their real buffers: Triton's autotuner would leave trial results behind.
    This tuner snapshots the launch's accumulators before timing and restores
    them afterwards, so the real run adds to exactly what was there. Under the
    interpreter it always returns ``interpret_config``.
    """

    def __init__(self, configs: dict[str, list[Config]], interpret_config: Config):
        self.configs = configs
        self.interpret_config = interpret_config
        self.best: dict[tuple, Config] = {}

    def pick(self, launch: Launch, key: tuple) -> Config:
        if interpreting():
            return self.interpret_config
        configs = self.configs[launch.family]
        forced = os.environ.get("DFT_OPS_CONFIG")
        if forced is not None:
            # bench/ and debugging: "i" picks configs[i] for every launch
            return configs[int(forced) % len(configs)]
        key = (launch.family, *key)
        if key not in self.best:
            if len(configs) == 1:
                self.best[key] = configs[0]
            else:
                saved = [t.clone() for t in launch.accumulators]
                self.best[key] = min(configs, key=lambda c: self._time(launch, c))
                for t, s in zip(launch.accumulators, saved):
                    t.copy_(s)
        return self.best[key]

    def run(self, launch: Launch, key: tuple) -> None:
        launch.run(self.pick(launch, key))

    @staticmethod
    def _time(launch: Launch, config: Config) -> float:
        from triton.testing import do_bench

        try:
            return do_bench(lambda: launch.run(config), warmup=5, rep=20, return_mode="median")
        except triton.runtime.errors.OutOfResources:
            return float("inf")


def unit_stride_inputs(targets, rows, bias, vocab: int):
    """(targets, rows, bias) ready for a kernel: unit stride, targets clamped to [-1, vocab].

    Kernels index these O(tokens) / O(vocabulary) tensors as contiguous; a
    caller's view (labels[:, 0], an expanded bias) is copied here, which costs
    nothing next to the products. Clamping keeps a label outside [0, V) outside
    after the kernel's int32 cast (2**32 + 5 would otherwise read as 5).
    """
    return (targets.clamp(-1, vocab).contiguous(),
            rows.contiguous() if rows is not None else None,
            bias.contiguous() if bias is not None else None)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bucket(n: int) -> int:
    """Coarse size class for tuning keys: token counts vary every step, tiles should not retune."""
    return min(next_power_of_2(n), 1 << 16)
