"""The implementations compared, each a loss function ``(hidden, weight, labels) -> mean loss``.

Every provider computes the same two losses on (N, D) hidden states, a (V, D)
head and (N,) labels (no label is ignored in the benchmark inputs):

- ``ce``:  mean over tokens of ``-log p(label)``;
- ``dft``: mean over tokens of ``-sg(p) log p`` (DFT paper, eq. 9), the mean
  dividing by the token count, never by the sum of weights.

A peer without DFT built in gets it the way its users would write it: the
per-token losses (``reduction="none"``) times ``exp(-loss).detach()``.
:func:`unavailable` says why a provider cannot run here (not installed,
needs CUDA, API missing); the CLI reports that reason instead of dropping it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# TRITON_INTERPRET=1 (``--interpret``): Triton kernels run on the CPU, for checking only
from dft_ops.backends import interpreting as triton_interpreting

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def dft_from_token_nll(token_nll: Tensor) -> Tensor:
    """Mean DFT loss from per-token ``-log p`` (N,): each weighted by its detached ``p``."""
    token_nll = token_nll.float()
    return (token_nll * torch.exp(-token_nll).detach()).mean()


def reduce_token_nll(token_nll: Tensor, objective: str) -> Tensor:
    return token_nll.float().mean() if objective == "ce" else dft_from_token_nll(token_nll)


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Provider:
    """One implementation. ``build(objective, device)`` returns its loss function and a note on how it runs."""

    name: str
    description: str
    package: str | None  # distribution whose version is recorded
    needs_cuda: bool
    build: Callable[[str, torch.device], tuple[LossFn, str]]
    probe: Callable[[], str | None]  # why it cannot run on any device, or None
    params: dict = field(default_factory=dict)  # copied into its records (e.g. workspace_mb)

    def unavailable(self, device: torch.device) -> str | None:
        """None when the provider can run on ``device``, else the reason it is skipped."""
        reason = self.probe()
        if reason is None and self.needs_cuda and device.type != "cuda" and not triton_interpreting():
            reason = "Triton kernels that need a CUDA GPU (no CPU path; --interpret runs them on the interpreter)"
        return reason

    def version(self) -> str | None:
        return package_version(self.package) if self.package else None


def _importable(module: str, dist: str) -> Callable[[], str | None]:
    def probe():
        try:
            importlib.import_module(module)
        except ImportError as e:
            installed = package_version(dist)
            return f"{dist} is not installed" if installed is None else f"{dist} {installed} fails to import: {e}"
        return None
    return probe


# --- plain PyTorch: materialized logits --------------------------------------------------------------

def materialized_loss(hidden: Tensor, weight: Tensor, labels: Tensor, objective: str) -> Tensor:
    """What Hugging Face / TRL / LLaMA-Factory do: N x V logits in the input dtype, upcast, cross-entropy."""
    logits = F.linear(hidden, weight).float()
    if objective == "ce":
        return F.cross_entropy(logits, labels)
    return dft_from_token_nll(F.cross_entropy(logits, labels, reduction="none"))


def _build_torch(objective, device):
    return (lambda h, w, y: materialized_loss(h, w, y, objective)), "eager"


def _materialized_ce(h, w, y):
    return materialized_loss(h, w, y, "ce")


def _materialized_dft(h, w, y):
    return materialized_loss(h, w, y, "dft")


def _build_torch_compile(objective, device):
    import torch._dynamo

    # one graph per objective whatever N, D, V: recompiles would otherwise hit the cache limit
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    fn = {"ce": _materialized_ce, "dft": _materialized_dft}[objective]
    return torch.compile(fn, dynamic=True), "torch.compile(dynamic=True), default mode"


# --- PyTorch's own fused linear + cross-entropy -------------------------------------------------------

def _probe_torch_lce():
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return (f"torch {torch.__version__} has no chunked F.linear_cross_entropy "
                "(torch.nn.LinearCrossEntropyOptions, torch >= 2.13)")
    return None


def _build_torch_lce(objective, device):
    options = torch.nn.LinearCrossEntropyOptions()  # "auto" chunking and accumulation for this device
    if objective == "ce":
        return (lambda h, w, y: F.linear_cross_entropy(h, w, y, options=options)), "options=LinearCrossEntropyOptions()"

    def dft(h, w, y):
        return dft_from_token_nll(F.linear_cross_entropy(h, w, y, reduction="none", options=options))
    return dft, "reduction='none' + DFT weighting, options=LinearCrossEntropyOptions()"


# --- Liger-Kernel ------------------------------------------------------------------------------------

def _build_liger(objective, device):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # defaults as users get them (accum_dtype=None: weight gradient accumulated in the input dtype)
    module = LigerFusedLinearCrossEntropyLoss(use_token_scaling=objective == "dft")
    note = "LigerFusedLinearCrossEntropyLoss(" + ("use_token_scaling=True" if objective == "dft" else "") + ")"
    return (lambda h, w, y: module(w, h, y)), note


# --- Cut Cross-Entropy -------------------------------------------------------------------------------

def _cce(**options):
    """Cut Cross-Entropy with these options: its Triton kernel on CUDA, its torch.compile implementation elsewhere."""
    def build(objective, device):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device.type == "cuda" else "torch_compile"
        note = ", ".join([f"impl={impl}"] + [f"{k}={v}" for k, v in options.items()])
        if objective == "ce":
            return (lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl, **options)), note

        def dft(h, w, y):
            return dft_from_token_nll(linear_cross_entropy(h, w, y, reduction="none", impl=impl, **options))
        return dft, note + ", reduction='none' + DFT weighting"
    return build


# --- TRL's fused LM head -----------------------------------------------------------------------------

TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


# TRL's backward imports trl.trainer.utils at call time (for maybe_gather_lm_head_ctx, which gathers
# ZeRO-3 shards and is a nullcontext otherwise), and that module imports datasets, which a GPU image may
# lack (bench/fetch_wheels.sh carries it). When that import fails, the benchmark gives the backward a
# stand-in module holding only maybe_gather_lm_head_ctx as it is without ZeRO-3 (nullcontext): the same
# computation, and the record's impl note says so.
TRL_UTILS = "trl.trainer.utils"


def _trl_backward_imports() -> str | None:
    """None when TRL's backward finds what it imports; else a note on the stand-in put in its place."""
    present = sys.modules.get(TRL_UTILS)
    if getattr(present, "bench_stand_in", None):
        return present.bench_stand_in
    try:
        importlib.import_module(TRL_UTILS)
        return None
    except Exception as e:  # noqa: BLE001 - ImportError, or datasets failing against this image's pyarrow
        module = types.ModuleType(TRL_UTILS)
        module.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        module.bench_stand_in = (f"{TRL_UTILS} stand-in (maybe_gather_lm_head_ctx = nullcontext, as without "
                                 f"ZeRO-3): {type(e).__name__}: {str(e)[:120]}")
        sys.modules[TRL_UTILS] = module
        return module.bench_stand_in


def _probe_trl():
    reason = _importable("trl.kernels.chunked_logprob", "trl")()
    if reason:
        return reason
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    params = list(inspect.signature(ChunkedLogProbFunction.forward).parameters)[1:]
    expected = ["hidden", "weight", "bias", "targets", "temperature", "chunk_size"]
    if params[:6] != expected:
        return f"trl {package_version('trl')}: ChunkedLogProbFunction.forward takes {params}, not {expected}..."
    return None


def _build_trl(objective, device):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    stand_in = _trl_backward_imports()

    # The loss SFTTrainer builds from the fused head's log-probs (sft_trainer.py, TRL 1.16):
    # per-token -logp, times exp(logp).detach() for loss_type="dft", summed over the token count.
    # Only the log-probs are asked for; SFTTrainer also asks for entropy and is_top1, for its metrics.
    def loss(h, w, y):
        logp = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ("log_probs",))[0]
        token_loss = -logp
        if objective == "dft":
            token_loss = token_loss * logp.exp().detach()
        return token_loss.sum() / y.numel()
    note = f"ChunkedLogProbFunction, chunk_size={TRL_VOCAB_CHUNK}, outputs=('log_probs',)"
    return loss, note + (f"; {stand_in}" if stand_in else "")


# --- dft-ops ----------------------------------------------------------------------------------------

def dft_ops_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" or triton_interpreting() else "torch"


def _dft_ops(*, filtered: bool = False, **options) -> Callable[[str, torch.device], tuple[LossFn, str]]:
    """dft-ops with these options; backend "auto" unless given (Triton on CUDA, PyTorch on CPU).

    ``filtered``: gradient filtering at Cut Cross-Entropy's default threshold ("high"),
    the inputs' dtype's machine epsilon / 32.
    """
    def build(objective, device):
        import dft_ops

        opts = {"backend": dft_ops_backend(device), **options}

        def loss(h, w, y):
            extra = dict(filter_eps=torch.finfo(h.dtype).eps / 32) if filtered else {}
            return dft_ops.linear_cross_entropy(h, w, y, objective=objective, **opts, **extra)
        notes = [f"{k}={v}" for k, v in opts.items()] + (["filter_eps=finfo(dtype).eps/32"] if filtered else [])
        return loss, ", ".join(notes)
    return build


def _dft_ops_probe(options: dict) -> Callable[[], str | None]:
    """Why this dft-ops mode cannot run (not installed; options this dft-ops refuses, e.g. a mode it does
    not have yet), or None. Options are checked by the public LossOptions, before any work."""
    def probe():
        reason = _importable("dft_ops", "dft-ops")()
        if reason:
            return reason
        import dft_ops

        try:
            dft_ops.LossOptions(**options)
        except (TypeError, ValueError) as e:
            return f"this dft-ops refuses {options}: {e}"
        return None
    return probe


def dft_ops_provider(name: str, description: str, options: dict, *, filtered: bool = False,
                     params: dict | None = None) -> Provider:
    """One dft-ops provider: ``options`` are linear_cross_entropy's (backend, backward_mode, workspace_mb, ...);
    backend="triton" needs CUDA (or the interpreter)."""
    return Provider(name, description, "dft-ops", options.get("backend") == "triton",
                    _dft_ops(filtered=filtered, **options), _dft_ops_probe(options), params=params or {})


def dft_ops_workspace_provider(workspace_mb: float) -> Provider:
    """The GEMM backward with a given workspace (the workspace sweep, ``--workspace-sweep``)."""
    return dft_ops_provider(f"dft-ops-gemm@{workspace_mb:g}MB",
                            f"dft-ops, backward_mode='gemm', workspace_mb={workspace_mb:g}",
                            dict(backend="triton", backward_mode="gemm", workspace_mb=workspace_mb),
                            params={"workspace_mb": float(workspace_mb)})


# Every dft-ops mode the benchmark compares, in the order a run measures them: (name, description,
# linear_cross_entropy options, gradient filtering). A new mode is one line here; a mode this dft-ops
# does not have yet (its LossOptions refuses the options) is reported as skipped with the reason.
DFT_OPS_MODES = (
    ("dft-ops", "dft-ops linear_cross_entropy as shipped (backward_mode='auto'; PyTorch backend on CPU)", {}, False),
    ("dft-ops-gemm", "dft-ops, backward_mode='gemm' (vocabulary splits, cuBLAS)",
     dict(backend="triton", backward_mode="gemm"), False),
    ("dft-ops-fused", "dft-ops, backward_mode='fused' (one atomic kernel, no workspace)",
     dict(backend="triton", backward_mode="fused"), False),
    # opt-in gradient filtering (fused mode), at CCE's default threshold (the torch backend is always exact)
    ("dft-ops-filter", "dft-ops with filter_eps (gradient filtering, fused mode)",
     dict(backend="triton", backward_mode="fused"), True),
    # gradients formed in the forward, every product in cuBLAS (6NDV); "auto" picks it wherever it applies
    ("dft-ops-onepass", "dft-ops, backward_mode='onepass' (gradients in the forward, cuBLAS products)",
     dict(backend="triton", backward_mode="onepass"), False),
    # the two passes of the backend as shipped (on CPU the PyTorch backend's; on CUDA the same as dft-ops-gemm):
    # what one-pass replaced, in the CPU goal
    ("dft-ops-two-pass", "dft-ops, backward_mode='gemm' on the backend as shipped (the two passes, 8NDV)",
     dict(backward_mode="gemm"), False),
)

# The peers, in the order a run measures them after the dft-ops modes (the fastest to build first;
# torch.compile's first compile costs tens of seconds, plain PyTorch materializes N x V logits).
PEERS = (
    Provider("liger", "Liger-Kernel LigerFusedLinearCrossEntropyLoss", "liger-kernel", True, _build_liger,
             _importable("liger_kernel.transformers", "liger-kernel")),
    Provider("cce-exact", "Cut Cross-Entropy without gradient filtering (filter_eps=None)", "cut-cross-entropy",
             False, _cce(filter_eps=None), _importable("cut_cross_entropy", "cut-cross-entropy")),
    Provider("cce", "Cut Cross-Entropy linear_cross_entropy (default gradient filtering)", "cut-cross-entropy",
             False, _cce(), _importable("cut_cross_entropy", "cut-cross-entropy")),
    Provider("trl", "TRL fused LM head (ChunkedLogProbFunction)", "trl", False, _build_trl, _probe_trl),
    Provider("torch-compile", "torch.compile of the plain PyTorch loss", None, False, _build_torch_compile,
             lambda: None),
    Provider("torch", "plain PyTorch: materialized logits + F.cross_entropy", None, False, _build_torch,
             lambda: None),
    Provider("torch-lce", "PyTorch F.linear_cross_entropy, chunked", None, False, _build_torch_lce,
             _probe_torch_lce),
)

PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    *(dft_ops_provider(name, description, options, filtered=filtered)
      for name, description, options, filtered in DFT_OPS_MODES),
    *PEERS,
)}

# the provider every other one is also compared with (agreement), besides the float64 reference
REFERENCE = "dft-ops"
