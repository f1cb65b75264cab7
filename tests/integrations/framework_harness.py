"""Shared by the framework tests: a tiny Llama and tokenizer on disk, a toy SFT data set, and two probes.

Nothing here stands in for a framework: each test imports the real one (or skips). The probes watch
the torch ops a training run dispatches:

- :class:`TensorMemory`: peak bytes of the tensors created while it is active (live storages,
  counted once per storage, freed when the last tensor using a storage dies) - a CPU stand-in for
  ``torch.cuda.max_memory_allocated``;
- the largest tensor whose last dimension is the vocabulary (the logits, their softmax and
  gradient, or a bounded block of them).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

N_WORDS = 997          # vocabulary: 3 special tokens + words; V = 1000
VOCAB = N_WORDS + 3
HIDDEN = 32


class TensorMemory(TorchDispatchMode):
    """Peak bytes held by tensors created while active, and the largest vocabulary-wide tensor."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.live: dict[int, list] = {}     # storage key -> [bytes, number of live tensors on it]
        self.current = self.peak = 0
        self.largest_vocab_wide = 0         # elements

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor):
        if t.device.type != "cpu" or t.is_sparse or t.layout != torch.strided:
            return
        if t.ndim >= 1 and t.shape[-1] == self.vocab:
            self.largest_vocab_wide = max(self.largest_vocab_wide, t.numel())
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def word_tokenizer(n_words: int = N_WORDS):
    """A word-level tokenizer (no download): <pad>=0, <eos>=1, <unk>=2, w0..w{n-1}."""
    import tokenizers
    import transformers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def tiny_llama_dir(path: Path, seed: int = 0, n_words: int = N_WORDS, layers: int = 2) -> Path:
    """Save a 2-layer Llama built from a config (random weights, fp32) and its tokenizer under ``path``."""
    import transformers

    tokenizer = word_tokenizer(n_words)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=0, bos_token_id=None, eos_token_id=1, tie_word_embeddings=False,
                                      max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def toy_sft_records(n: int = 16, seed: int = 0, n_words: int = N_WORDS, lengths=(10, 60)):
    """Instruction / answer pairs of words (the answer walks the vocabulary with a stride, so it is learnable)."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        k_in = int(torch.randint(lengths[0], lengths[1], (1,), generator=g))
        k_out = int(torch.randint(lengths[0], lengths[1], (1,), generator=g))
        start = int(torch.randint(0, n_words, (1,), generator=g))
        prompt = " ".join(f"w{(start + 7 * j) % n_words}" for j in range(k_in))
        answer = " ".join(f"w{(start + 3 * j) % n_words}" for j in range(k_out))
        records.append({"instruction": prompt, "input": "", "output": answer})
    return records


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


class StepRecorder:
    """A transformers TrainerCallback (built lazily): the gradients before each optimizer step, and peak memory."""

    @staticmethod
    def make(vocab: int, steps_with_grads=(0,)):
        import transformers

        class _Recorder(transformers.TrainerCallback):
            def __init__(self):
                self.grads: dict[int, dict[str, torch.Tensor]] = {}
                self.memory = TensorMemory(vocab)
                self._entered = False
                self.log_history = []

            def on_train_begin(self, args, state, control, **kwargs):
                self.memory.__enter__()
                self._entered = True

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if state.global_step in steps_with_grads:
                    self.grads[state.global_step] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}

            def on_train_end(self, args, state, control, **kwargs):
                self.log_history = list(state.log_history)
                if self._entered:
                    self.memory.__exit__(None, None, None)
                    self._entered = False

        return _Recorder()


def losses(log_history):
    return [entry["loss"] for entry in log_history if "loss" in entry]
