"""The one-pass head's row passes (kernels/row_pass.py) against float64, on the interpreter.

Workspaces are (C, V) views of (C, ld) buffers with ld > V, C and V multiples of no block
(the interpreter's tiles are 8 x 256: several rows per program, rows past C clamped, several
tiles per row and a ragged tail). Every input is random; masked columns (-inf, as a -inf bias gives), a row of -inf
logits, labels outside [0, V) and on masked columns are in every draw. The float64 reference
is written here from the contract's formulas, not from the kernels.
"""

from __future__ import annotations

import pytest
import torch

from helpers import rel_err

from dft_ops.kernels import row_pass
from dft_ops.kernels.row_pass import RowStats, logit_grad_in_place, row_stats

INF = float("inf")
# NumPy's warnings on the interpreter for -inf / NaN lanes that a select then discards (as a GPU
# computes them too); every output is checked free of NaN instead
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")


# ---------------------------------------------------------------- float64 reference


def ref_logits(u, softcap=None, temperature=None):
    z = u.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature if temperature is not None else z


def ref_slope(u, softcap=None, temperature=None):
    """dz/du in float64 (1 / cosh^2 has no cancellation where tanh saturates; -inf gives 0)."""
    slope = torch.ones_like(u, dtype=torch.float64)
    if softcap is not None:
        slope = torch.cosh(u.double() / softcap).pow(-2)
    return slope / temperature if temperature is not None else slope


def ref_log_softmax(z):
    """log softmax with -inf where a logit is -inf, also on a row of -inf logits (no NaN)."""
    lse = z.logsumexp(dim=1, keepdim=True)
    return torch.where(z == -INF, -INF, z - torch.where(lse == -INF, 0.0, lse)), lse.squeeze(1)


def ref_kl(lp, lq):
    """sum p (log p - log q) over p > 0: 0 without p, +inf where q has no mass and p has."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), 0.0).sum(dim=1)


def ref_stats(u, y, *, softcap=None, temperature=None, class_weight=None, r=None, r_softcap=None) -> dict:
    z = ref_logits(u, softcap, temperature)
    V = z.shape[1]
    lp, lse = ref_log_softmax(z)
    valid = (y >= 0) & (y < V)
    col = y.clamp(0, V - 1)[:, None]
    p = lp.exp()
    out = dict(
        lse=lse, target_logit=torch.where(valid, z.gather(1, col)[:, 0], 0.0),
        target_logprob=torch.where(valid, lp.gather(1, col)[:, 0], 0.0),
        entropy=-torch.where(p > 0, p * lp, 0.0).sum(dim=1), max_logit=z.max(dim=1).values,
        argmax=z.argmax(dim=1),
    )
    w = class_weight.double() if class_weight is not None else torch.ones(V, dtype=torch.float64)
    out["smooth_sum"] = (w * torch.where(w != 0, z, 0.0)).sum(dim=1)
    if r is not None:
        lq, out["second_lse"] = ref_log_softmax(ref_logits(r, r_softcap, temperature))
        out["reverse_kl"], out["forward_kl"] = ref_kl(lp, lq), ref_kl(lq, lp)
    return out


def ref_grad(u, y, a, b, c=None, e=None, f=None, *, softcap=None, temperature=None, class_weight=None, r=None,
             r_softcap=None):
    """The contract's G in float64 from the float64 logits (and exact lse)."""
    z = ref_logits(u, softcap, temperature)
    C, V = z.shape
    lp, _ = ref_log_softmax(z)
    s = lp.exp()
    g = a.double()[:, None] * s
    hit = (y >= 0) & (y < V)
    g[hit, y[hit]] -= b.double()[hit]
    if c is not None:
        w = class_weight.double() if class_weight is not None else torch.ones(V, dtype=torch.float64)
        g -= c.double()[:, None] * w[None, :]
    if e is not None or f is not None:
        lq, _ = ref_log_softmax(ref_logits(r, r_softcap, temperature))
        if e is not None:
            g -= e.double()[:, None] * lq.exp()
        if f is not None:
            g += f.double()[:, None] * torch.where(s > 0, s * (lp - lq), 0.0)
    return g * ref_slope(u, softcap, temperature)


# ---------------------------------------------------------------- inputs


def workspace(C, V, ld, *, scale=3.0, masked=True, empty_row=True, offset=0.0):
    """Random raw logits as a (C, V) view of a (C, ld) fp32 buffer (the padding is garbage, never read:
    NaN). ``masked``: a few whole columns -inf; ``empty_row``: row 1 all -inf."""
    buf = torch.full((C, ld), float("nan"))
    u = buf[:, :V]
    u.copy_(torch.randn(C, V) * scale + offset)
    if masked:
        u[:, torch.randperm(V)[:max(1, V // 50)]] = -INF
    if empty_row and C > 1:
        u[1] = -INF
    return u


def labels(C, V, u=None):
    """Random labels; among them ignored (-100), past the vocabulary (V + 3), and, given the logits,
    one on a masked (-inf) column."""
    y = torch.randint(0, V, (C,))
    y[0] = -100
    if C > 2:
        y[2] = V + 3
    if u is not None and C > 3:
        masked = (u[3] == -INF).nonzero()
        if len(masked):
            y[3] = masked[0, 0]
    return y


def second_head(u, scale=2.0):
    """A second head's raw logits, its own row stride, -inf where the first head's columns are masked
    (a shared masked vocabulary) and a constant offset from the first (the KLs must not see it)."""
    C, V = u.shape
    r = torch.full((C, V + 40), float("nan"))[:, :V]
    r.copy_(u.nan_to_num(neginf=0.0) * 0.5 + torch.randn(C, V) * scale + 7.0)
    r[:, (u == -INF).all(dim=0)] = -INF
    return r


def check_close(name, ours, ref, rtol=2e-5, atol=2e-5):
    ours, ref = ours.double(), ref.double()
    assert torch.equal(ours.isinf(), ref.isinf()) and torch.equal(ours[ours.isinf()], ref[ref.isinf()]), \
        f"{name}: infinities differ:\n{ours}\n{ref}"
    assert not ours.isnan().any(), f"{name}: NaN"
    fin = ref.isfinite()
    err = (ours[fin] - ref[fin]).abs()
    bound = atol + rtol * ref[fin].abs()
    assert (err <= bound).all(), f"{name}: max error {(err - bound).max().item():.3g} over the bound"


# ---------------------------------------------------------------- row_stats

STATS_CASES = [
    dict(),
    dict(with_stats=True),
    dict(softcap=20.0, with_stats=True),
    dict(temperature=0.7, smoothing=True),
    dict(softcap=15.0, temperature=1.3, with_stats=True, smoothing=True, class_weight=True),
    dict(second=True),
    dict(second=True, second_softcap=10.0, temperature=0.8, with_stats=True),
    dict(second=True, softcap=25.0, second_softcap=12.0, smoothing=True, class_weight=True, with_stats=True),
]


@pytest.mark.parametrize("case", STATS_CASES, ids=lambda c: "+".join(c) or "plain")
def test_row_stats(case):
    C, V, ld = 37, 1000, 1008
    u = workspace(C, V, ld)
    y = labels(C, V, u)
    u[5, [17, 700]] = 40.0  # a tie for the max across tiles: the first index wins
    u[6, [130, 131]] = 40.0  # and within a tile
    cw = torch.rand(V) * 1.5 + 0.1 if case.get("class_weight") else None
    if cw is not None:
        cw[::7] = 0.0  # zero weights, some on masked columns
        cw[(u == -INF).all(dim=0)] = 0.0  # a nonzero weight on a masked class would make smooth_sum -inf
    r = second_head(u) if case.get("second") else None
    if r is not None:
        r[4] = -INF  # the second head's own empty row: KL(p || q) = inf there, KL(q || p) = 0
    opts = dict(softcap=case.get("softcap"), temperature=case.get("temperature"))
    with_stats, smoothing = case.get("with_stats", False), case.get("smoothing", False)
    ours = row_stats(u, y, with_stats=with_stats, smoothing=smoothing, class_weight=cw, second_logits=r,
                     second_softcap=case.get("second_softcap"), **opts)
    ref = ref_stats(u, y, class_weight=cw, r=r, r_softcap=case.get("second_softcap"), **opts)
    assert isinstance(ours, RowStats)
    names = ["lse", "target_logit", "target_logprob"]
    names += ["entropy", "max_logit"] if with_stats else []
    names += ["smooth_sum"] if smoothing else []
    names += ["second_lse", "reverse_kl", "forward_kl"] if r is not None else []
    for name in names:
        assert getattr(ours, name).dtype == torch.float32
        check_close(name, getattr(ours, name), ref[name], rtol=1e-5 if name != "smooth_sum" else 3e-5)
    for name in set(RowStats._fields) - set(names) - {"argmax"}:
        assert getattr(ours, name) is None, name
    if with_stats:
        assert ours.argmax.dtype == torch.int64
        assert torch.equal(ours.argmax, ref["argmax"])
        assert ours.argmax[5] == 17 and ours.argmax[6] == 130
        # the label logit is gathered from the very values the max is taken over
        is_max = ours.argmax == y
        assert torch.equal(ours.target_logit[is_max], ours.max_logit[is_max])
    else:
        assert ours.argmax is None
    if case.get("softcap") is None:
        # the row of -inf logits (a soft-cap makes them -softcap, finite): lse -inf, entropy 0
        assert ours.lse[1] == -INF and ours.target_logprob[1] == -INF
        if with_stats:
            assert ours.entropy[1] == 0.0


def test_row_stats_label_is_argmax_exactly():
    """target_logit >= max_logit exactly where the label holds the max, soft-cap and temperature on."""
    C, V, ld = 21, 700, 704
    u = workspace(C, V, ld, masked=False, empty_row=False)
    y = u.argmax(dim=1)
    y[::3] = torch.randint(0, V, (len(y[::3]),))
    ours = row_stats(u, y, softcap=9.0, temperature=0.9, with_stats=True)
    assert torch.equal(ours.target_logit >= ours.max_logit, ours.argmax == y)


@pytest.mark.parametrize("V,ld", [(100, 112), (512, 512), (1031, 1040)], ids=["tail-only", "no-tail", "prime-V"])
def test_row_stats_shapes(V, ld):
    """A vocabulary under one tile, one no tile leaves ragged, a prime one (50257's kind of oddness)."""
    C = 9
    u = workspace(C, V, ld)
    y = labels(C, V, u)
    r = second_head(u)
    ours = row_stats(u, y, with_stats=True, smoothing=True, second_logits=r)
    ref = ref_stats(u, y, r=r)
    for name in ("lse", "target_logprob", "entropy", "max_logit", "smooth_sum", "reverse_kl", "forward_kl"):
        check_close(name, getattr(ours, name), ref[name])
    assert torch.equal(ours.argmax, ref["argmax"])


def test_row_stats_offset_between_heads_cancels():
    """A constant offset between the heads (or of both) leaves the KLs exactly where they were."""
    C, V, ld = 11, 600, 608
    u = workspace(C, V, ld, masked=False, empty_row=False)
    r = second_head(u)
    y = labels(C, V)
    base = row_stats(u, y, second_logits=r)
    shifted = row_stats(u, y, second_logits=(r + 1000.0).contiguous())
    ref = ref_stats(u, y, r=r)
    check_close("reverse_kl", shifted.reverse_kl, ref["reverse_kl"], rtol=1e-5, atol=2e-5)
    check_close("forward_kl", shifted.forward_kl, ref["forward_kl"], rtol=1e-5, atol=2e-5)
    assert (shifted.reverse_kl - base.reverse_kl).abs().max() < 2e-5


def test_row_stats_edge_sizes():
    empty = torch.empty(0, 50)
    out = row_stats(empty, torch.empty(0, dtype=torch.long), with_stats=True)
    assert out.lse.shape == (0,) and out.argmax.dtype == torch.int64 and out.smooth_sum is None
    u = workspace(1, 300, 300, masked=False)
    y = torch.tensor([7])
    check_close("lse", row_stats(u, y).lse, ref_stats(u, y)["lse"])
    with pytest.raises(AssertionError):  # the one-pass head builds the workspace: shapes are asserted
        row_stats(u.double(), y)
    with pytest.raises(AssertionError):
        row_stats(torch.randn(300, 4).T, torch.zeros(4, dtype=torch.long))  # column-major


# ---------------------------------------------------------------- logit_grad_in_place

GRAD_CASES = [
    dict(),
    dict(temperature=0.7),
    dict(softcap=20.0),
    dict(uniform=True),
    dict(uniform=True, class_weight=True, softcap=18.0, temperature=1.2),
    dict(q=True),
    dict(gap=True, second_softcap=9.0),
    dict(q=True, gap=True, uniform=True, class_weight=True, softcap=25.0, second_softcap=11.0, temperature=0.9),
]


def _grad_inputs(C, V, ld, case, **workspace_opts):
    u = workspace(C, V, ld, **workspace_opts)
    y = labels(C, V, u)
    coef = dict(a=torch.rand(C) + 0.5, b=torch.rand(C) + 0.5,
                c=torch.rand(C) * 0.1 if case.get("uniform") else None,
                e=torch.rand(C) if case.get("q") else None, f=torch.rand(C) if case.get("gap") else None)
    cw = None
    if case.get("class_weight"):
        cw = torch.rand(V) + 0.1
        cw[::7] = 0.0
    r = second_head(u) if case.get("q") or case.get("gap") else None
    opts = dict(softcap=case.get("softcap"), temperature=case.get("temperature"), class_weight=cw)
    return u, y, coef, r, opts


def _stats_for(u, y, r, opts, case):
    return row_stats(u, y, softcap=opts["softcap"], temperature=opts["temperature"], second_logits=r,
                     second_softcap=case.get("second_softcap"))


def _run_grad(u, y, coef, r, opts, case, out_dtype, stats=None):
    """Both passes, as the one-pass head runs them, on a copy of the workspace (row_stats' results
    given: only the second); returns (G, workspace)."""
    stats = stats or _stats_for(u, y, r, opts, case)
    ws = _copy_strided(u)
    g = logit_grad_in_place(ws, y, stats.lse, **coef, logp=stats.target_logprob, second_logits=r,
                            second_lse=stats.second_lse, second_softcap=case.get("second_softcap"),
                            out_dtype=out_dtype, **opts)
    return g, ws


def _padding(ws):
    """The row padding [V, ld) of a workspace view (NaN as workspace() made it)."""
    C, V = ws.shape
    return torch.as_strided(ws, (C, ws.stride(0) - V), (ws.stride(0), 1), ws.storage_offset() + V)


def _copy_strided(u):
    """A fresh (C, V) view of a (C, ld) buffer holding u's values, same strides."""
    C, V = u.shape
    buf = torch.full((C, u.stride(0)), float("nan"))
    buf[:, :V] = u
    return buf[:, :V]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "+".join(c) or "plain")
def test_logit_grad_fp32(case):
    C, V, ld = 37, 1000, 1008
    u, y, coef, r, opts = _grad_inputs(C, V, ld, case)
    g, ws = _run_grad(u, y, coef, r, opts, case, torch.float32)
    assert g.data_ptr() == ws.data_ptr() and g.stride() == ws.stride() and g.dtype == torch.float32
    ref = ref_grad(u, y, **coef, r=r, r_softcap=case.get("second_softcap"), **opts)
    # lse comes rounded to fp32 (half an ulp of |lse|): every s carries it relatively
    check_close("G", g, ref, rtol=3e-6, atol=1e-7 * ref.abs().max().item())
    # masked logits and the row of -inf logits: exactly 0 from every term with a probability
    # (the e term's is the second head's)
    masked = (u == -INF) & ((r == -INF) if case.get("q") else True)
    masked[torch.arange(C)[(y >= 0) & (y < V)], y[(y >= 0) & (y < V)]] = False  # a masked label gets -b
    if not case.get("uniform") or case.get("softcap"):
        assert (g[masked] == 0).all()
    assert _padding(ws).isnan().all()  # never written past V


@pytest.mark.parametrize("case", [GRAD_CASES[0], GRAD_CASES[4], GRAD_CASES[7]], ids=["plain", "one-head", "two-heads"])
def test_logit_grad_narrow_in_place(case):
    """bf16 / fp16 G packed into the first half of each row's bytes: exactly the fp32 kernel's G
    rounded to nearest-even (so no logit was overwritten before it was read, and the interpreter
    rounds as a GPU does), and within that rounding of float64."""
    C, V, ld = 37, 1000, 1008
    u, y, coef, r, opts = _grad_inputs(C, V, ld, case)
    stats = _stats_for(u, y, r, opts, case)
    g32, _ = _run_grad(u, y, coef, r, opts, case, torch.float32, stats)
    ref = ref_grad(u, y, **coef, r=r, r_softcap=case.get("second_softcap"), **opts)
    for out_dtype, half_ulp in ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)):
        g, ws = _run_grad(u, y, coef, r, opts, case, out_dtype, stats)
        assert g.dtype == out_dtype and g.shape == (C, V) and g.stride() == (2 * ld, 1)
        assert g.data_ptr() == ws.data_ptr()
        assert torch.equal(g, g32.to(out_dtype)), f"{(g.float() != g32.to(out_dtype).float()).sum()} entries differ"
        assert _padding(ws).isnan().all()  # the row padding: never read (NaN would show) nor written
        tiny = torch.finfo(out_dtype).tiny  # below it, subnormal spacing
        check_close("G", g, ref, rtol=half_ulp * (1 + 1e-3), atol=tiny + 1e-7 * ref.abs().max().item())


@pytest.mark.parametrize("V,ld", [(100, 112), (512, 512), (1031, 1040)], ids=["tail-only", "no-tail", "prime-V"])
def test_logit_grad_shapes(V, ld):
    case = GRAD_CASES[7]
    u, y, coef, r, opts = _grad_inputs(9, V, ld, case)
    g, _ = _run_grad(u, y, coef, r, opts, case, torch.bfloat16)
    ref = ref_grad(u, y, **coef, r=r, r_softcap=case.get("second_softcap"), **opts)
    check_close("G", g, ref, rtol=2.0**-8 * (1 + 1e-3), atol=1e-7 * ref.abs().max().item() + 1e-38)


def test_logit_grad_edge_sizes():
    g = logit_grad_in_place(torch.empty(0, 20), torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0),
                            torch.empty(0), out_dtype=torch.bfloat16)
    assert g.shape == (0, 20) and g.dtype == torch.bfloat16
    u = workspace(1, 257, 272, masked=False)
    y = torch.tensor([256])
    lse = ref_logits(u).logsumexp(dim=1).float()
    ref = ref_grad(u, y, torch.ones(1), torch.ones(1))
    check_close("G", logit_grad_in_place(_copy_strided(u), y, lse, torch.ones(1), torch.ones(1)), ref,
                rtol=3e-6, atol=1e-7)
    with pytest.raises(AssertionError):
        logit_grad_in_place(u, y, lse, torch.ones(1), torch.ones(1), e=torch.ones(1))  # no second head


# ---------------------------------------------------------------- precision on peaked rows


def peaked(C, V, ld, D):
    """Logits of order 20 (as an LLM head's), the label ~15 above the rest: median p ~ 0.9995."""
    u = workspace(C, V, ld, scale=1.0, masked=False, empty_row=False, offset=20.0)
    y = torch.randint(0, V, (C,))
    u[torch.arange(C), y] += 15.0 + torch.randn(C)
    return u, y, torch.randn(V, D, dtype=torch.float64)


def test_label_entry_precision_on_peaked_rows():
    """d_hidden = G W on peaked rows: the label's entry from row_stats' accurate log p is ~1e-7 off
    float64; formed naively (a s - b in fp32) or from z_y - lse it inherits lse's rounding (~1e-3).
    The test fails on either of those forms."""
    C, V, ld, D = 64, 1000, 1008, 32
    u, y, W = peaked(C, V, ld, D)
    rows = torch.arange(C)
    a = b = torch.full((C,), 1.0 / C)  # CE, mean over the chunk
    ref = ref_grad(u, y, a, b)
    p = ref_log_softmax(ref_logits(u))[0][rows, y].exp()
    assert 0.999 < p.median() < 0.9999
    d_ref = ref @ W

    def err(g):
        return rel_err(g.double() @ W, d_ref)

    stats = row_stats(_copy_strided(u), y)
    ours = err(logit_grad_in_place(_copy_strided(u), y, stats.lse, a, b, logp=stats.target_logprob))
    from_lse = err(logit_grad_in_place(_copy_strided(u), y, stats.lse, a, b))
    s = torch.exp(u - stats.lse[:, None])  # the naive form, in fp32 from the same lse
    naive = a[:, None] * s
    naive[rows, y] -= b
    naive = err(naive)
    assert ours < 1e-6, ours
    assert naive > 100 * ours and from_lse > 100 * ours, (naive, from_lse, ours)
    # bf16 G: the rounding floor (2^-9 relative, averaged down by the product) dominates all forms
    bf16 = err(logit_grad_in_place(_copy_strided(u), y, stats.lse, a, b, logp=stats.target_logprob,
                                   out_dtype=torch.bfloat16))
    assert bf16 < 3e-3, bf16


def test_target_logprob_is_accurate_on_peaked_rows():
    C, V, ld, _ = 48, 1000, 1008, 1
    u, y, _ = peaked(C, V, ld, 1)
    ours = row_stats(u, y, softcap=50.0)
    ref = ref_stats(u, y, softcap=50.0)
    rel = ((ours.target_logprob.double() - ref["target_logprob"]).abs() / ref["target_logprob"].abs()).max()
    assert rel < 1e-5, rel
    via_lse = ((ours.target_logit - ours.lse).double() - ref["target_logprob"]).abs().max()
    assert via_lse > 1e-7  # what z_y - lse would carry instead (lse's rounding, absolute)


def test_interpreter_config_covers_clamped_rows():
    """The interpreter's tiles hold several rows, so test shapes exercise rows past C in a program."""
    assert row_pass.INTERPRET_CONFIG.blocks["BLOCK_N"] > 1
