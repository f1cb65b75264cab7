"""Fine-tune a causal LM with DFT on long packed sequences, patched by dft-ops vs unpatched.

Each mode runs in its own process (clean peak-memory numbers; an out-of-memory
failure is reported, not fatal) on the same model initialisation and data:

- patched:   ``dft_ops.patch(model, objective=...)``; the loss never builds logits.
- unpatched: the model's own forward builds the (tokens x vocabulary) logits;
             the loss is the model's cross-entropy (``--objective ce``) or DFT
             written in PyTorch on those logits (as TRL / LLaMA-Factory do).

Data: documents packed back to back into rows of ``--seq-len`` tokens,
padding-free (``position_ids`` restart at 0 at every document, no attention
mask, the first label of each document is -100). Synthetic documents repeat a
random motif with noise (learnable, so the loss moves), or ``--text FILE``
packs a local text file (tokenized by the checkpoint's tokenizer, or as bytes).

CPU, about a minute:
    python examples/finetune_long_context.py
GPU, 32k tokens per sequence on a Qwen2-shaped model with Qwen's 152k vocabulary:
    python examples/finetune_long_context.py --seq-len 32768 --hidden-size 1024 --layers 4 \\
        --vocab-size 151936 --dtype bfloat16 --gradient-checkpointing --steps 10
A local checkpoint instead of a random model:
    python examples/finetune_long_context.py --model /path/to/checkpoint --text corpus.txt --seq-len 16384
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

FAMILIES = {  # --model NAME: a randomly initialised config of a real family
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2",
                   help=f"a family for a random model ({', '.join(FAMILIES)}) or a local checkpoint directory")
    p.add_argument("--hidden-size", type=int, default=128, help="random model: hidden size")
    p.add_argument("--layers", type=int, default=2, help="random model: decoder layers")
    p.add_argument("--vocab-size", type=int, default=32000, help="random model: vocabulary size")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sequence")
    p.add_argument("--batch-size", type=int, default=1, help="packed sequences per step")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per mode (the first is warm-up, not timed)")
    p.add_argument("--objective", default="dft", help="dft-ops objective: dft or ce")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder layers in backward")
    p.add_argument("--attn-implementation", default="sdpa", help="e.g. sdpa, eager, flash_attention_2")
    p.add_argument("--text", default=None, help="pack this local text file instead of synthetic documents")
    p.add_argument("--modes", default="patched,unpatched", help="comma-separated: patched, unpatched")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # child process: run one mode
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # child process: JSON result path
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ model, data


def load_model(args, device, dtype):
    import transformers

    if args.model in FAMILIES:
        config_name, model_name = FAMILIES[args.model]
        heads = max(1, args.hidden_size // 64)
        config = getattr(transformers, config_name)(
            vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
            num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
            head_dim=args.hidden_size // heads, max_position_embeddings=max(args.seq_len, 4096),
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
        config._attn_implementation = args.attn_implementation
        torch.manual_seed(args.seed)
        model, tokenizer = getattr(transformers, model_name)(config).to(dtype), None
    elif os.path.isdir(args.model):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation=args.attn_implementation)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model) if args.text else None
    else:
        raise SystemExit(f"--model: {args.model!r} is neither a family ({', '.join(FAMILIES)}) nor a local directory")
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device).train(), tokenizer


def synthetic_documents(n_tokens, vocab, generator):
    """Documents of random length, each a random motif repeated with 5% noise (yields lists of token ids)."""
    produced = 0
    while produced < n_tokens:
        length = int(torch.randint(64, 2048, (1,), generator=generator))
        motif = torch.randint(3, vocab, (int(torch.randint(8, 48, (1,), generator=generator)),), generator=generator)
        doc = motif.repeat(length // len(motif) + 1)[:length]
        noise = torch.rand(length, generator=generator) < 0.05
        doc[noise] = torch.randint(3, vocab, (int(noise.sum()),), generator=generator)
        produced += length
        yield doc


def text_documents(path, tokenizer, vocab):
    """Paragraphs of a local text file as token ids (the checkpoint's tokenizer, or UTF-8 bytes)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        paragraphs = [p for p in f.read().split("\n\n") if p.strip()]
    if not paragraphs:
        raise SystemExit(f"--text: {path} has no text")
    while True:
        for p in paragraphs:
            ids = tokenizer(p)["input_ids"] if tokenizer is not None else list(p.encode("utf-8"))
            yield torch.tensor(ids, dtype=torch.long) % vocab


def packed_batches(args, vocab, tokenizer, n_batches):
    """(input_ids, position_ids, labels), each (batch, seq_len), padding-free packed."""
    g = torch.Generator().manual_seed(args.seed + 1)
    need = n_batches * args.batch_size * args.seq_len
    docs = text_documents(args.text, tokenizer, vocab) if args.text else synthetic_documents(need * 2, vocab, g)
    ids, pos = [], []
    for doc in docs:
        ids.append(doc)
        pos.append(torch.arange(len(doc)))
        if sum(map(len, ids)) >= need:
            break
    ids, pos = torch.cat(ids)[:need], torch.cat(pos)[:need]
    shape = (n_batches, args.batch_size, args.seq_len)
    ids, pos = ids.view(shape), pos.view(shape).clone()
    pos[..., 0] = 0  # every row starts a (possibly continued) document
    labels = ids.clone()
    labels[pos == 0] = -100  # no label crosses a document boundary
    return list(zip(ids, pos, labels))


# -------------------------------------------------------------------------------------------------- one mode


def unpatched_loss(model, input_ids, position_ids, labels, objective):
    if objective == "ce":
        return model(input_ids=input_ids, position_ids=position_ids, labels=labels).loss
    logits = model(input_ids=input_ids, position_ids=position_ids).logits  # (batch, seq, vocab)
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    valid = targets != -100
    logp = F.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (-logp.exp().detach() * logp)[valid].sum() / valid.sum().clamp(min=1)


def run_mode(args):
    import dft_ops
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tokenizer = load_model(args, device, dtype)
    vocab = model.get_output_embeddings().weight.shape[0]
    batches = packed_batches(args, vocab, tokenizer, args.steps)
    if args.mode == "patched":
        dft_ops.patch(model, objective=args.objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, timed_tokens, timed_seconds = [], 0, 0.0
    bar = tqdm(batches, desc=f"{args.mode:>9}", unit="step", file=sys.stderr)
    for step, (input_ids, position_ids, labels) in enumerate(bar):
        input_ids, position_ids, labels = (t.to(device) for t in (input_ids, position_ids, labels))
        start = time.perf_counter()
        if args.mode == "patched":
            loss = model(input_ids=input_ids, position_ids=position_ids, labels=labels).loss
        else:
            loss = unpatched_loss(model, input_ids, position_ids, labels, args.objective)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # synchronizes
        if step > 0:  # the first step is warm-up (allocator, kernels, lazy init)
            timed_seconds += time.perf_counter() - start
            timed_tokens += input_ids.numel()
        losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.4f}",
                        tok_s=f"{timed_tokens / timed_seconds:,.0f}" if timed_seconds else "-")
    result = {"losses": losses, "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else None,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "vocab": vocab, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "dtype": str(dtype)}
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# ------------------------------------------------------------------------------------------------- driver


def main(argv=None):
    args = parse_args(argv)
    if args.mode is not None:
        try:
            result = run_mode(args)
        except torch.cuda.OutOfMemoryError as exc:
            result = {"oom": str(exc).split("\n")[0]}
        with open(args.result, "w") as f:
            json.dump(result, f)
        return

    argv = list(sys.argv[1:] if argv is None else argv)
    results = {}
    for mode in args.modes.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--mode", mode, "--result", path])
        try:
            with open(path) as f:
                results[mode] = json.load(f)
        except (OSError, json.JSONDecodeError):
            results[mode] = {"failed": f"exit code {proc.returncode} (killed for memory?)"}
        finally:
            if os.path.exists(path):
                os.unlink(path)
    report(args, results)


def report(args, results):
    any_result = next((r for r in results.values() if "losses" in r), {})
    tokens = args.batch_size * args.seq_len
    print(f"\nmodel {args.model} ({any_result.get('params_m', float('nan')):.1f}M params, vocab "
          f"{any_result.get('vocab', '?')}, {any_result.get('dtype', '?')}), objective {args.objective}, "
          f"{args.batch_size} x {args.seq_len} tokens per step, {args.steps} steps, device "
          f"{any_result.get('device', '?')}")
    if "vocab" in any_result:
        print(f"logits of one step: {tokens * any_result['vocab'] * 4 / 2**20:,.0f} MiB in fp32")
    memory_key = "peak_cuda_mb" if "peak_cuda_mb" in any_result else "peak_rss_mb"
    memory_name = "peak CUDA MiB" if memory_key == "peak_cuda_mb" else "peak RSS MiB"
    print(f"{'mode':<10} {'tokens/s':>10} {memory_name:>14} {'first loss':>11} {'last loss':>10}")
    for mode, r in results.items():
        if "losses" not in r:
            print(f"{mode:<10} {r.get('oom') and 'out of memory' or r.get('failed')}")
            continue
        print(f"{mode:<10} {r['tokens_per_s']:>10,.0f} {r[memory_key]:>14,.0f} {r['losses'][0]:>11.5f} "
              f"{r['losses'][-1]:>10.5f}")


if __name__ == "__main__":
    main()
