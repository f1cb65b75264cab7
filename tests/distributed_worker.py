"""One rank of the distributed tests (spawned by tests/test_distributed.py, gloo on CPU, world size 2).

Usage: python distributed_worker.py OUT.json CASE [CASE ...], with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. Every case builds the same tiny Qwen2
(a config built in code, no download) on every rank, runs it under one engine with
each rank holding half of a global batch, and compares the loss and every gathered
parameter gradient with a single-process run of the patched model on the whole batch.
Rank 0 writes {case: {"loss_err", "grad_err", "worst", "n_grads"} or {"error"}} to OUT.json.

The per-rank loss is the one transformers.Trainer computes: the sum over the rank's
tokens divided by the token count of the whole batch (num_items_in_batch), times the
world size, because DDP / FSDP / DeepSpeed average gradients across ranks.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist

import dft_ops
from helpers import rel_err  # tests/ is this script's directory, so first on sys.path
from rank_harness import serve

SCRATCH = tempfile.gettempdir()  # the results' directory, shared by the ranks (set by main)
V, SEQ, BATCH = 131, 13, 4  # vocabulary and sequence length: not multiples of any block size
OBJECTIVE = "dft"
ASFT_KL = 0.3  # the "asft-*" cases: ASFT with a frozen reference model, replicated on every rank


def tiny_qwen2(tied: bool = False):
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # O(1) logits, so that DFT's weight p is not ~1/V everywhere
        model.lm_head.weight.normal_(0.0, 3.0 / model.lm_head.weight.shape[1] ** 0.5)
    return model.train()


def frozen_reference():
    """ASFT's reference: the tiny model with perturbed weights, plain (unsharded) on every rank."""
    reference = tiny_qwen2()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return reference.requires_grad_(False)


def patch_args(asft: bool) -> dict:
    if not asft:
        return {"objective": OBJECTIVE}
    return {"objective": dft_ops.objectives.ASFT(ASFT_KL, base=OBJECTIVE), "reference": frozen_reference()}


def tiny_lora():
    """The tiny model with LoRA adapters on q/v (B nonzero, the same on every rank): ASFT's reference is the model
    with its adapters disabled."""
    import peft

    model = peft.get_peft_model(tiny_qwen2(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              lora_dropout=0.0))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.train()


def global_batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, V, (BATCH, SEQ), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, :9] = -100  # a long prompt: ranks hold very different token counts
    labels[-1, -3:] = -100  # padding
    return input_ids, labels


def n_items(labels) -> torch.Tensor:
    return (labels[:, 1:] != -100).sum()


def local_batch(rank: int, world: int):
    input_ids, labels = global_batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return input_ids[rows], labels[rows], n_items(labels)


def reference(tied: bool = False, asft: bool = False, lora: bool = False, two_pass: bool = False):
    """The patched model in one process on the whole batch: (loss, {name: grad}).

    ``two_pass``: the engine shards the head (FSDP2, ZeRO-3), where "auto" runs two passes; the reference does
    too, so that both sides do the same arithmetic (the tied model's DFT loss is ~1e-4, where the two modes'
    fp32 rounding differs by ~2e-4 relative, and the one-pass value is the one closer to float64)."""
    mode = {"backward_mode": "gemm"} if two_pass else {}
    if lora:
        model = dft_ops.patch(tiny_lora(), objective=dft_ops.objectives.ASFT(ASFT_KL, base=OBJECTIVE),
                              reference="adapters_disabled")
    else:
        model = dft_ops.patch(tiny_qwen2(tied), **patch_args(asft), **mode)
    input_ids, labels = global_batch()
    loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=n_items(labels)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model, rank, world, backward=None):
    """Forward and backward of the rank's half of the batch; returns the loss averaged over ranks."""
    input_ids, labels, items = local_batch(rank, world)
    loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=items).loss * world
    (backward or torch.Tensor.backward)(loss)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / world


def full(grad):
    from torch.distributed.tensor import DTensor

    return grad.full_tensor() if isinstance(grad, DTensor) else grad


# --------------------------------------------------------------------------------------------------- engines


def fsdp2(head="root", reshard=True, patch="before", tied=False, asft=False):
    """FSDP2: every decoder layer in its own group; the head in the root's group, in its own
    ("own"), or with the embedding it is tied to ("with-embedding"); patched before or after fully_shard."""

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = tiny_qwen2(tied)
        if patch == "before":
            dft_ops.patch(model, **patch_args(asft))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        if head == "own":
            fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=reshard)
        elif head == "with-embedding":
            fully_shard([model.model.embed_tokens, model.lm_head], mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        if patch == "after":
            dft_ops.patch(model, **patch_args(asft))
        loss = step(model, rank, world)
        return loss, {n: full(p.grad) for n, p in model.named_parameters()}

    run.tied, run.asft, run.two_pass = tied, asft, True
    return run


def fsdp2_lora_adapters_disabled():
    """FSDP2 (head in its own group) on a PEFT model whose reference is itself with the adapters disabled."""

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = tiny_lora()
        dft_ops.patch(model, objective=dft_ops.objectives.ASFT(ASFT_KL, base=OBJECTIVE), reference="adapters_disabled")
        base = model.get_base_model()
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(base.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        loss = step(model, rank, world)
        return loss, {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}

    run.lora = True
    return run


def fsdp2_bf16():
    """FSDP2 with a bf16 MixedPrecisionPolicy (fp32 gradient reduction), the head in its own group. The model runs in
    bf16 either way, so the reference is the unpatched model under the same engine, its DFT loss computed in fp32
    from its bf16 logits; the test holds this case to bf16 tolerance."""

    def shard(model, mesh):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model.lm_head, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def dft_from_logits(model, rank, world):
        input_ids, labels, items = local_batch(rank, world)
        logp = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), -1)
        target = labels[:, 1:]
        keep = target != -100
        logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep]
        loss = (-(logp.detach().exp()) * logp).sum() / items * world  # -sg(p) log p, Trainer's normalization
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / world

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        model = shard(dft_ops.patch(tiny_qwen2(), objective=OBJECTIVE), mesh)
        loss = step(model, rank, world)
        unpatched = shard(tiny_qwen2(), mesh)
        ref_loss = dft_from_logits(unpatched, rank, world)
        return (loss, {n: full(p.grad) for n, p in model.named_parameters()},
                (ref_loss, {n: full(p.grad) for n, p in unpatched.named_parameters()}))

    return run


def fsdp2_full_tensor_outside_the_head():
    """A negative control, not dft-ops' patch: the loss computed after the forward from ``lm_head.weight.full_tensor()``
    (how the patch read a sharded head before it computed the loss inside the head's forward). full_tensor()'s
    backward keeps only the local slice of the head's gradient, nothing is summed across ranks: the comparison
    must see the head's gradient wrong."""

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = tiny_qwen2()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh)
        input_ids, labels, items = local_batch(rank, world)
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
        loss = dft_ops.linear_cross_entropy(hidden, model.lm_head.weight.full_tensor(), labels, objective=OBJECTIVE,
                                            shift=True, num_items_in_batch=items) * world
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / world, {n: full(p.grad) for n, p in model.named_parameters()}

    return run


def ddp(patch="after", asft=False):
    """DDP; "after": dft_ops.patch(ddp_model) patches the module it wraps."""

    def run(rank, world):
        from torch.nn.parallel import DistributedDataParallel

        model = tiny_qwen2()
        if patch == "before":
            dft_ops.patch(model, **patch_args(asft))
        wrapped = DistributedDataParallel(model)
        if patch == "after":
            assert dft_ops.patch(wrapped, **patch_args(asft)) is wrapped
        loss = step(wrapped, rank, world)
        return loss, {n: p.grad for n, p in model.named_parameters()}

    run.asft = asft
    return run


def deepspeed_zero(stage, patch="before", tied=False, asft=False):
    """DeepSpeed ZeRO-1/2/3 (fp32, a plain SGD optimizer); "after": dft_ops.patch(engine)."""

    def run(rank, world):
        import deepspeed
        from deepspeed.utils import safe_get_full_grad

        model = tiny_qwen2(tied)
        if patch == "before":
            dft_ops.patch(model, **patch_args(asft))
        config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 0.0, "steps_per_print": 10**9}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if patch == "after":
            dft_ops.patch(engine, **patch_args(asft))
        loss = step(engine, rank, world, backward=engine.backward)
        grads = {}
        for name, p in engine.module.named_parameters():
            grad = safe_get_full_grad(p)  # a collective under ZeRO-3: every rank calls it
            grads[name] = None if grad is None else grad.detach().clone().reshape(
                getattr(p, "ds_shape", None) or p.shape)
        return loss, grads

    run.tied, run.asft, run.two_pass = tied, asft, stage == 3
    return run


def whole_batch(model):
    """Forward and backward of the whole batch on every rank (tensor parallelism: the ranks split the layers' work)."""
    from torch.distributed.tensor import Shard

    input_ids, labels = global_batch()
    loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=n_items(labels)).loss
    loss.backward()
    placements = model.lm_head.weight.grad.placements
    if placements != (Shard(0),):  # the head's gradient stays the rank's rows
        raise AssertionError(f"lm_head.weight.grad placements {placements}")
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def tensor_parallel_head(replicated_output=False):
    """torch's ColwiseParallel on lm_head (a vocabulary-sharded DTensor head, the input a replicated DTensor):
    the patched model computes the vocabulary-parallel loss; the head's output sharded (the default) or gathered."""

    def run(rank, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        model = tiny_qwen2()
        style = ColwiseParallel(output_layouts=Replicate()) if replicated_output else ColwiseParallel()
        parallelize_module(model, init_device_mesh("cpu", (world,)), {"lm_head": style})
        dft_ops.patch(model, objective=OBJECTIVE)
        return whole_batch(model)

    return run


def tp_plan_auto():
    """transformers' tensor parallelism (from_pretrained(tp_plan="auto")): every linear layer and the embedding
    sharded, lm_head ColwiseParallel ("colwise_gather_output") with a Shard(0) DTensor weight."""

    def run(rank, world):
        import transformers

        path = os.path.join(SCRATCH, "tiny-qwen2")
        if rank == 0:
            tiny_qwen2().save_pretrained(path)
        dist.barrier()
        model = transformers.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).train()
        if "lm_head" not in (getattr(model, "_tp_plan", None) or {}):
            raise AssertionError(f"lm_head is not in the model's tensor-parallel plan {model._tp_plan}")
        dft_ops.patch(model, objective=OBJECTIVE)
        return whole_batch(model)

    return run


def accelerate_ddp():
    """accelerate: the patched model through Accelerator.prepare (DDP on CPU) and accelerator.backward."""

    def run(rank, world):
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model = dft_ops.patch(tiny_qwen2(), objective=OBJECTIVE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        loss = step(prepared, rank, world, backward=accelerator.backward)
        return loss, {n: p.grad for n, p in accelerator.unwrap_model(prepared).named_parameters()}

    return run


def accelerate_fsdp2():
    """accelerate's FSDP plugin (fsdp_version=2, each decoder layer wrapped), the patched model through prepare()."""

    def run(rank, world):
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["Qwen2DecoderLayer"])
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        model = dft_ops.patch(tiny_qwen2(), objective=OBJECTIVE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        loss = step(prepared, rank, world, backward=accelerator.backward)
        return loss, {n: full(p.grad) for n, p in accelerator.unwrap_model(prepared).named_parameters()}

    return run


def trainer_ddp():
    """transformers.Trainer, one optimizer step (lr 0) of the whole batch over two processes."""

    def run(rank, world):
        import transformers

        input_ids, labels = global_batch()

        class Rows(torch.utils.data.Dataset):
            def __len__(self):
                return BATCH

            def __getitem__(self, i):
                return {"input_ids": input_ids[i], "labels": labels[i]}

        grads = {}

        class Snapshot(transformers.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

        model = dft_ops.patch(tiny_qwen2(), objective=OBJECTIVE)
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(
                output_dir=out, max_steps=1, per_device_train_batch_size=BATCH // world, optim="sgd",
                learning_rate=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no", use_cpu=True,
                logging_steps=1, disable_tqdm=True, seed=0, ddp_backend="gloo")
            trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Snapshot()])
            trainer.train()
        assert dft_ops.patching.patch_state(model).calls == 1
        # Trainer logs the loss rounded; the gradients are the exact check
        logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        return torch.tensor(logged), grads

    return run


CASES = {
    "fsdp2-root": fsdp2(head="root"),
    "fsdp2-root-patch-after": fsdp2(head="root", patch="after"),
    "fsdp2-root-no-reshard": fsdp2(head="root", reshard=False),
    "fsdp2-own-group": fsdp2(head="own"),
    "fsdp2-own-group-patch-after": fsdp2(head="own", patch="after"),
    "fsdp2-own-group-no-reshard": fsdp2(head="own", reshard=False),
    "fsdp2-own-group-no-reshard-patch-after": fsdp2(head="own", reshard=False, patch="after"),
    "fsdp2-tied-root": fsdp2(head="root", tied=True),
    "fsdp2-tied-with-embedding": fsdp2(head="with-embedding", tied=True),
    "fsdp2-tied-with-embedding-patch-after": fsdp2(head="with-embedding", tied=True, patch="after"),
    "control-fsdp2-full-tensor-outside-the-head": fsdp2_full_tensor_outside_the_head(),
    "ddp-patch-wrapper": ddp(patch="after"),
    "ddp-patch-before": ddp(patch="before"),
    "zero1": deepspeed_zero(1),
    "zero2": deepspeed_zero(2),
    "zero3": deepspeed_zero(3),
    "zero3-patch-engine": deepspeed_zero(3, patch="after"),
    "zero3-tied": deepspeed_zero(3, tied=True),
    "tp-colwise-head": tensor_parallel_head(),
    "tp-colwise-head-replicated-output": tensor_parallel_head(replicated_output=True),
    "tp-plan-auto": tp_plan_auto(),
    "accelerate-ddp": accelerate_ddp(),
    "accelerate-fsdp2": accelerate_fsdp2(),
    "fsdp2-bf16-own-group": fsdp2_bf16(),
    "trainer-ddp": trainer_ddp(),
    "asft-fsdp2-own-group": fsdp2(head="own", asft=True),
    "asft-ddp-patch-wrapper": ddp(patch="after", asft=True),
    "asft-zero3": deepspeed_zero(3, asft=True),
    "asft-fsdp2-lora-adapters-disabled": fsdp2_lora_adapters_disabled(),
}


def compare(run, loss, grads, same_engine_reference=None) -> dict:
    """Errors against the one-process run of the patched model, or against a reference the case ran itself."""
    ref_loss, ref_grads = same_engine_reference or reference(getattr(run, "tied", False), getattr(run, "asft", False),
                                                             getattr(run, "lora", False), getattr(run, "two_pass", False))
    missing = sorted(set(ref_grads) - {n for n, g in grads.items() if g is not None})
    if missing:
        return {"error": f"no gradient for {missing}"}
    errors = {n: rel_err(full(grads[n]), ref_grads[n]) for n in ref_grads}
    worst = max(errors, key=errors.get)
    return {"loss_err": rel_err(loss, ref_loss), "grad_err": errors[worst], "worst": worst,
            "n_grads": len(errors)}


def main(out_path: str, names: list[str]) -> None:
    global SCRATCH
    SCRATCH = os.path.dirname(os.path.abspath(out_path))
    serve(out_path, names, CASES, compare)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
