"""Fine-tune a tiny causal LM with DFT and with ASFT (DFT + KL to the base model) on the same data.

    python examples/asft_vs_dft.py                 # CPU, a few minutes
    python examples/asft_vs_dft.py --out docs/objectives --kl-coef 0.5 --direction reverse

What it shows (the ASFT paper's point): DFT concentrates probability on the
tokens the model already likes and drifts away from the base model; the KL
anchor keeps the fine-tuned distribution near the base model's while it learns.

- A synthetic language with a "pretraining" grammar A: each token has a
  preferred successor (probability 0.7), otherwise any token follows.
- A base model (a tiny randomly initialised LlamaForCausalLM) trained on A with
  ``dft_ops.patch(model, objective="ce")``.
- Fine-tuning data from grammar B, which changes the preferred successor of
  half of the tokens.
- Two copies of the base model fine-tuned on the same batches:
  ``dft_ops.patch(model, objective="dft")`` and
  ``dft_ops.patch(model, objective=ASFT(kl_coef), reference=base)``: the
  frozen base model is the reference; the loss streams both heads and builds
  no logits. (For a PEFT model, ``reference="adapters_disabled"`` uses the
  same model with its adapters off instead of a copy.)
- Every few steps, on held-out text of both grammars: the mean KL of each model
  to the base model, and the cross-entropy on grammar A (what fine-tuning
  forgets); at the end, the histogram of the label probabilities on the
  fine-tuning data before and after (the DFT paper's Figure 2). These
  measurements use the tiny model's materialized logits.

Writes ``asft_vs_dft.png`` and ``asft_vs_dft.json`` under ``--out`` (default: ``dft-ops-examples`` in the
temporary directory).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dft_ops
from dft_ops.objectives import ASFT

VOCAB, SEQ, BINS = 96, 32, 10


def sample_text(successor: torch.Tensor, n: int, gen: torch.Generator, keep: float = 0.7) -> torch.Tensor:
    """(n, SEQ) tokens of a grammar: after token t comes ``successor[t]`` with probability ``keep``, else any token."""
    noise = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    follows = torch.rand(n, SEQ, generator=gen) < keep
    tokens = noise.clone()
    for t in range(1, SEQ):
        tokens[:, t] = torch.where(follows[:, t], successor[tokens[:, t - 1]], noise[:, t])
    return tokens


def tiny_llama(seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                      pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def train(model, batches, lr: float, on_step=None) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step, batch in enumerate(batches):
        loss = model(input_ids=batch, labels=batch).loss  # the patched forward: dft-ops' fused loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, loss.item())


@torch.no_grad()
def log_softmaxes(model, tokens: torch.Tensor) -> torch.Tensor:
    """(n, SEQ - 1, V) next-token log-probabilities (eval mode: the unpatched forward, tiny vocabulary)."""
    model.eval()
    out = F.log_softmax(model(input_ids=tokens).logits[:, :-1].float(), -1)
    model.train()
    return out


def label_probs(model, tokens: torch.Tensor) -> torch.Tensor:
    logp = log_softmaxes(model, tokens).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return logp.exp().flatten()


def kl_to(model, base_logq: torch.Tensor, tokens: torch.Tensor, direction: str) -> float:
    """Mean per-token KL between the model and the base model, in the direction ASFT penalizes."""
    logp = log_softmaxes(model, tokens)
    if direction == "forward":  # KL(base || model)
        return (base_logq.exp() * (base_logq - logp)).sum(-1).mean().item()
    return (logp.exp() * (logp - base_logq)).sum(-1).mean().item()


def cross_entropy(model, tokens: torch.Tensor) -> float:
    return -label_probs(model, tokens).log().mean().item()


def histogram(p: torch.Tensor) -> list[int]:
    return torch.histc(p, bins=BINS, min=0.0, max=1.0).long().tolist()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hist, ax_kl, ax_ce) = plt.subplots(1, 3, figsize=(16, 4.6))
    edges = [i / BINS for i in range(BINS + 1)]
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    width = 1 / BINS / 4
    for k, (name, counts) in enumerate(results["histograms"].items()):
        ax_hist.bar([c + (k - 1) * width for c in centers], counts, width=width, label=name)
    ax_hist.set_yscale("log")
    ax_hist.set_xlabel("probability of the label token (fine-tuning data)")
    ax_hist.set_ylabel("tokens (log scale)")
    ax_hist.set_title("label probabilities before and after")
    for name, curve in results["curves"].items():
        steps = [c["step"] for c in curve]
        ax_kl.plot(steps, [c["kl_to_base"] for c in curve], "o-", ms=3, label=name)
        ax_ce.plot(steps, [c["ce_grammar_a"] for c in curve], "o-", ms=3, label=name)
    ax_kl.set_title(f"KL to the base model ({results['direction']}), held-out text")
    ax_kl.set_xlabel("fine-tuning step")
    ax_ce.set_title("cross-entropy on the pretraining grammar (forgetting)")
    ax_ce.set_xlabel("fine-tuning step")
    for ax in (ax_hist, ax_kl, ax_ce):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DFT vs ASFT (kl_coef={results['kl_coef']}, {results['direction']} KL) on a tiny Llama, "
                 f"{results['steps']} steps, same batches", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps (the same batches for both objectives)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--kl-coef", type=float, default=0.5)
    p.add_argument("--direction", choices=("forward", "reverse"), default="forward")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dft-ops-examples",
                   help="folder for asft_vs_dft.png and .json (a scratch folder by default, never the current one)")
    args = p.parse_args(argv)
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    successor_a = torch.randperm(VOCAB, generator=gen)
    successor_b = successor_a.clone()
    changed = torch.randperm(VOCAB, generator=gen)[: VOCAB // 2]
    successor_b[changed] = torch.randint(0, VOCAB, (len(changed),), generator=gen)
    pretrain = sample_text(successor_a, args.pretrain_steps * args.batch_size, gen).split(args.batch_size)
    finetune = sample_text(successor_b, args.steps * args.batch_size, gen).split(args.batch_size)
    held_out_a, held_out_b = sample_text(successor_a, 64, gen), sample_text(successor_b, 64, gen)
    held_out = torch.cat([held_out_a, held_out_b])

    base = dft_ops.patch(tiny_llama(seed=0), objective="ce")
    train(base, pretrain, lr=3e-3)
    dft_ops.unpatch(base)
    base.eval().requires_grad_(False)
    print(f"base model: CE on grammar A {cross_entropy(base, held_out_a):.3f}, on B {cross_entropy(base, held_out_b):.3f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    base_logq = log_softmaxes(base, held_out)
    fine_tuning_text = torch.cat(list(finetune))
    results = {"kl_coef": args.kl_coef, "direction": args.direction, "steps": args.steps,
               "histograms": {"base model": histogram(label_probs(base, fine_tuning_text))}, "curves": {}}

    runs = {"DFT": dict(objective="dft"),
            f"ASFT (DFT + {args.kl_coef} KL)": dict(objective=ASFT(args.kl_coef, direction=args.direction),
                                                    reference=base)}
    for name, patch_args in runs.items():
        model = dft_ops.patch(copy.deepcopy(base).requires_grad_(True), **patch_args)
        curve = results["curves"][name] = []

        def evaluate(step, loss, model=model, curve=curve):
            if step % args.eval_every == 0 or step == 1:
                curve.append({"step": step, "loss": loss, "kl_to_base": kl_to(model, base_logq, held_out, args.direction),
                              "ce_grammar_a": cross_entropy(model, held_out_a),
                              "ce_grammar_b": cross_entropy(model, held_out_b)})

        train(model, finetune, lr=3e-3, on_step=evaluate)
        results["histograms"][name] = histogram(label_probs(model, fine_tuning_text))
        last = curve[-1]
        print(f"{name}: KL to base {last['kl_to_base']:.3f}, CE on A {last['ce_grammar_a']:.3f}, "
              f"on B {last['ce_grammar_b']:.3f} ({time.time() - t0:.0f} s)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "asft_vs_dft.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "asft_vs_dft.png")
    print(f"wrote {args.out / 'asft_vs_dft.png'} and .json in {time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
