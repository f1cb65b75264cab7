"""Label-probability histograms before and after fine-tuning with each objective (DFT paper, Figure 2).

    python -m bench.objectives [--steps 150] [--out docs/objectives]

Everything is made here and runs on a CPU in about a minute:

- a synthetic "language": a first-order Markov chain over V tokens, where a
  third of the tokens are followed almost deterministically by one token
  (grammatical glue) and the others by a peaked random distribution;
- a "base model" (embedding -> MLP -> head over the previous token) trained
  with plain CE on chain A: it has prior competence;
- fine-tuning data from chain B, which keeps half of A's rows and redraws the
  rest: some supervised tokens are already likely, others are new;
- for each objective, the base model fine-tuned for ``--steps`` Adam steps
  on the same batches, with dft_ops.linear_cross_entropy (torch backend);
- the histogram of label probabilities over the fine-tuning set before and
  after, gathered with ``return_stats=True`` and dft_ops.TokenStatsRecorder.

Writes ``label_prob_histograms.png`` (log-scale counts, as the paper's
Figure 2) and ``label_prob_histograms.json`` (the numbers) under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import dft_ops
from dft_ops import objectives as o
from dft_ops.callbacks import CE_LOSS, LABEL_PROB, TOKENS, TOP1

VOCAB, HIDDEN, SEQ, BATCH = 128, 64, 32, 32
BINS = 10


def markov_chain(generator: torch.Generator, glue_frac: float = 1 / 3) -> torch.Tensor:
    """(V, V) transition matrix: glue tokens have one 0.95-likely successor, others Dirichlet(0.1) rows."""
    rows = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.1)).sample((VOCAB,))
    glue = torch.rand(VOCAB, generator=generator) < glue_frac
    successor = torch.randint(0, VOCAB, (VOCAB,), generator=generator)
    deterministic = torch.full((VOCAB, VOCAB), 0.05 / (VOCAB - 1))
    deterministic[torch.arange(VOCAB), successor] = 0.95
    return torch.where(glue[:, None], deterministic, rows)


def sample(chain: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, SEQ) token sequences from the chain."""
    tokens = torch.empty(n, SEQ, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (n,), generator=generator)
    for t in range(1, SEQ):
        tokens[:, t] = torch.multinomial(chain[tokens[:, t - 1]], 1, generator=generator).squeeze(1)
    return tokens


class TinyLM(nn.Module):
    """Next-token model of the previous token: hidden states for dft_ops, head weight separate."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return h + self.mlp(h)

    def loss(self, tokens: torch.Tensor, objective, **kwargs):
        # position t predicts tokens[:, t + 1]: shift=True on the tokens themselves
        return dft_ops.linear_cross_entropy(self.hidden(tokens), self.head.weight, tokens, objective=objective,
                                            shift=True, **kwargs)


def label_stats(model: TinyLM, data: torch.Tensor) -> tuple[dict, list[float]]:
    """Mean statistics and per-bin token counts of the label probabilities over ``data``."""
    recorder = dft_ops.TokenStatsRecorder(bins=BINS)
    with torch.no_grad():
        for batch in data.split(256):
            _, stats = model.loss(batch, "ce", return_stats=True)
            recorder.record(stats, torch.ones_like(stats.is_top1))
    summary = recorder.collect()
    counts = [summary[k] * summary[TOKENS] for k in recorder.histogram_keys()]
    return summary, counts


def train(model: TinyLM, batches: list[torch.Tensor], make_objective, lr: float) -> None:
    """Adam steps, one per batch; ``make_objective(batch, step)`` gives the objective of each step, or
    (objective, this batch's per-token call arguments)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step, batch in enumerate(batches):
        made = make_objective(batch, step)
        objective, inputs = made if isinstance(made, tuple) else (made, {})
        loss = model.loss(batch, objective, **inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def logprobs_of(model: TinyLM, batch: torch.Tensor) -> torch.Tensor:
    """(B, SEQ - 1) label log-probs of a model: the per-token input of PSFT / iw-SFT."""
    with torch.no_grad():
        return model.loss(batch, "ce", return_stats=True)[1].logprob


def objectives_to_compare(base: TinyLM, finetuned: TinyLM, psft_refresh: int):
    """name -> make_objective(batch, step). PSFT's old policy is the fine-tuned model refreshed every
    ``psft_refresh`` steps (PPO-style iterations); iw-SFT's reference is the base model."""
    old_policy = {}

    def psft(batch, step):
        if step % psft_refresh == 0:
            old_policy["model"] = copy.deepcopy(finetuned)
        return o.PSFT(), {"old_logprobs": logprobs_of(old_policy["model"], batch)}

    fixed = {
        "CE (SFT)": o.CE(),
        "DFT": o.DFT(),
        "Power(10)  (-p^10)": o.Power(10),
        "Chord  (p(1-p))": o.Chord(),
        "Focal(2)": o.Focal(2.0),
        "Threshold(ce, min_p=0.1)": o.Threshold("ce", min_p=0.1),
        "SequenceDFT(product)": o.SequenceDFT("product"),
        "SequenceDFT(geometric)": o.SequenceDFT("geometric"),
    }
    makers = {name: (lambda batch, step, obj=obj: obj) for name, obj in fixed.items()}
    makers["PSFT (old = every %d steps)" % psft_refresh] = psft
    makers["ImportanceWeighted (ref = base)"] = lambda batch, step: (o.ImportanceWeighted(),
                                                                     {"ref_logprobs": logprobs_of(base, batch)})
    return makers


def plot(before: list[float], after: dict[str, list[float]], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(after)
    cols = 5
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), sharey=True)
    centers = [(i + 0.5) / BINS for i in range(BINS)]
    width = 0.9 / BINS / 2
    for ax, name in zip(axes.flat, names):
        # empty bins are left blank (NaN), not drawn at the log axis' floor
        ax.bar([c - width / 2 for c in centers], [b or math.nan for b in before], width, color="0.65", label="base")
        ax.bar([c + width / 2 for c in centers], [a or math.nan for a in after[name]], width, color="C0",
               label=f"after {steps} steps")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("label probability", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("tokens (log scale)", fontsize=8)
    axes.flat[0].legend(fontsize=7, loc="upper center")
    fig.suptitle("Label-probability histogram over the fine-tuning set, before and after each objective "
                 "(synthetic Markov data, tiny model; cf. DFT paper Fig. 2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps per objective")
    parser.add_argument("--pretrain-steps", type=int, default=250)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("docs/objectives"))
    args = parser.parse_args(argv)
    started = time.time()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    chain_a = markov_chain(g)
    chain_b = torch.where(torch.rand(VOCAB, generator=g)[:, None] < 0.5, chain_a, markov_chain(g))
    base = TinyLM()
    pretrain_set = sample(chain_a, BATCH * 64, g).split(BATCH)
    train(base, [pretrain_set[i % 64] for i in range(args.pretrain_steps)], lambda b, s: o.CE(), lr=1e-2)
    sft_set = sample(chain_b, BATCH * 16, g)  # the fine-tuning data: 16 batches, revisited
    batches = [sft_set[i % 16 * BATCH:(i % 16 + 1) * BATCH] for i in range(args.steps)]

    summary_before, before = label_stats(base, sft_set)
    results = {"before": {"summary": summary_before, "counts": before}, "after": {}}
    print(f"{'objective':34s} {'mean p':>7s} {'CE':>6s} {'top-1':>6s}   (base: {summary_before[LABEL_PROB]:.3f} "
          f"{summary_before[CE_LOSS]:.3f} {summary_before[TOP1]:.3f})")
    finetuned = TinyLM()
    for name, make_objective in objectives_to_compare(base, finetuned, psft_refresh=10).items():
        finetuned.load_state_dict(base.state_dict())
        train(finetuned, batches, make_objective, lr=args.lr)
        summary, counts = label_stats(finetuned, sft_set)
        results["after"][name] = {"summary": summary, "counts": counts}
        print(f"{name:34s} {summary[LABEL_PROB]:7.3f} {summary[CE_LOSS]:6.3f} {summary[TOP1]:6.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "label_prob_histograms.png"
    plot(before, {k: v["counts"] for k, v in results["after"].items()}, png, args.steps)
    results["setup"] = dict(vocab=VOCAB, hidden=HIDDEN, seq=SEQ, batch=BATCH, bins=BINS, steps=args.steps,
                            pretrain_steps=args.pretrain_steps, lr=args.lr, torch=torch.__version__,
                            seconds=round(time.time() - started, 1))
    (args.out / "label_prob_histograms.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {png} and label_prob_histograms.json in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
