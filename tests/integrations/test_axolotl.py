"""The axolotl plugin (dft_ops.integrations.axolotl.DFTOpsPlugin) against axolotl's own DFT.

axolotl 0.19's DFT is Liger's fused linear cross-entropy with ``liger_use_token_scaling`` (its
Triton kernels run here on the CPU interpreter). Runs the real axolotl (``make test-axolotl`` builds
its venv) on a tiny Llama saved from a config, one process per run (axolotl keeps plugins and Liger's
class patches for the life of a process): losses and the first step's gradients must agree at fp32
tolerance, and the dft-ops run must hold less memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("axolotl", reason="axolotl is not installed here: `make test-axolotl` builds its venv "
                    "(.venv/frameworks/axolotl by default) and runs this file there")
pytest.importorskip("axolotl.integrations.base", reason="axolotl does not import here")

import torch  # noqa: E402
import yaml  # noqa: E402

import dft_ops  # noqa: E402

from framework_harness import rel_err, tiny_llama_dir, toy_sft_records, write_jsonl  # noqa: E402

HERE = Path(__file__).parent
TOL = 2e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl")
    tiny_llama_dir(root / "model")
    write_jsonl(root / "toy.jsonl", toy_sft_records(24))
    return root


def config(workdir, name, **overrides):
    cfg = dict(base_model=str(workdir / "model"), datasets=[dict(path=str(workdir / "toy.jsonl"), ds_type="json",
                                                                  type="alpaca")],
               dataset_prepared_path=str(workdir / f"prepared_{name}"), val_set_size=0.0, sequence_len=128,
               sample_packing=False, micro_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
               learning_rate=1e-3, optimizer="adamw_torch", lr_scheduler="linear", warmup_steps=0,
               logging_steps=1, save_strategy="no", output_dir=str(workdir / name), bf16=False, fp16=False,
               tf32=False, seed=0, shuffle_merged_datasets=False, dataloader_num_workers=0,
               plugins=["axolotl_runner.RecorderPlugin"])
    cfg.update(overrides)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path, timeout=600):
    out = path.with_suffix(".pt")
    # never an empty entry (the working directory: a checkout's kernels/ would shadow Hugging Face's `kernels`)
    paths = [str(HERE), str(HERE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths),
               TRITON_INTERPRET="1", AXOLOTL_DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(HERE / "axolotl_runner.py"), str(path), str(out)], env=env, cwd=path.parent,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"axolotl run {path.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out)


def compare(plain, fused, label):
    assert len(plain["losses"]) == len(fused["losses"]) > 0
    for a, b in zip(plain["losses"], fused["losses"]):
        assert abs(a - b) <= TOL * max(abs(a), 1e-3), (plain["losses"], fused["losses"])
    grads_a, grads_b = plain["grads"], fused["grads"]
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    worst = max(rel_err(grads_b[k], grads_a[k]) for k in grads_a)
    report = dict(plain_peak=plain["peak"], fused_peak=fused["peak"], plain_vocab_wide=plain["vocab_wide"],
                  fused_vocab_wide=fused["vocab_wide"], worst_grad_rel_err=worst,
                  losses=(plain["losses"], fused["losses"]), trainer=fused["trainer"])
    print(f"\naxolotl measurements ({label}): {report}")
    assert worst < TOL, report
    assert fused["peak"] < plain["peak"], report
    return report


LIGER_DFT = dict(liger_fused_linear_cross_entropy=True, liger_use_token_scaling=True, liger_rms_norm=False,
                 liger_glu_activation=False, liger_rope=False, liger_layer_norm=False, liger_cross_entropy=False)
PLUGIN = "dft_ops.integrations.axolotl.DFTOpsPlugin"


@pytest.mark.slow
def test_plugin_dft_matches_axolotls_liger_dft(workdir):
    small = dict(micro_batch_size=2, max_steps=2)  # the Triton interpreter is slow: 4 micro-batches of 2
    plain = run(config(workdir, "liger_dft", **LIGER_DFT, **small,
                       plugins=["axolotl.integrations.liger.LigerPlugin", "axolotl_runner.RecorderPlugin"]))
    # both on Triton (the CPU interpreter here): dft-ops' fused backward needs no workspace
    fused = run(config(workdir, "plugin_dft", plugins=[PLUGIN, "axolotl_runner.RecorderPlugin"],
                       dft_ops_objective="dft", dft_ops_options=dict(backend="triton", backward_mode="fused"), **small))
    compare(plain, fused, "DFT, Liger token scaling vs the dft-ops plugin (Triton, fused backward)")


@pytest.mark.slow
def test_plugin_ce_with_sample_packing_matches_axolotl(workdir):
    """Packed rows (position_ids, no padding) through the plugin: objective "ce" against axolotl's own CE."""
    packed = dict(sample_packing=True, pad_to_sequence_len=True, micro_batch_size=2, max_steps=2)
    plain = run(config(workdir, "plain_packed_ce", **packed))
    fused = run(config(workdir, "plugin_packed_ce", plugins=[PLUGIN, "axolotl_runner.RecorderPlugin"],
                       dft_ops_objective="ce", **packed))
    assert plain["vocab_wide"] > 0
    compare(plain, fused, "CE with sample packing, axolotl vs the dft-ops plugin (torch backend)")


@pytest.mark.slow
def test_plugin_asft_with_lora_trains_end_to_end(workdir):
    """axolotl has no ASFT of its own: an end-to-end LoRA run with the reference = adapters disabled."""
    result = run(config(workdir, "plugin_asft", plugins=[PLUGIN, "axolotl_runner.RecorderPlugin"],
                        adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True,
                        lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,  # CUDA-only kernels
                        learning_rate=1e-2, dft_ops_objective=dict(name="ASFT", kl_coef=0.5),
                        dft_ops_reference="adapters_disabled"))
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["grads"] and all(torch.isfinite(g).all() for g in result["grads"].values())
    assert all("lora_" in name for name in result["grads"])  # only the adapters train
    assert result["vocab_wide"] == 0 or result["vocab_wide"] < result["peak"]


def test_plugin_asft_loss_and_gradients_against_float64(workdir):
    """The plugin's post_model_load on a LoRA model, ASFT against its adapters-disabled self, vs float64."""
    import peft
    import transformers

    from dft_ops.integrations.axolotl import DFTOpsPlugin
    from axolotl.utils.dict import DictDefault

    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       lora_dropout=0.0, init_lora_weights=False))
    cfg = DictDefault(dft_ops_objective={"name": "ASFT", "kl_coef": 0.5}, dft_ops_reference="adapters_disabled",
                      dft_ops_options={})
    DFTOpsPlugin().post_model_load(cfg, model)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 1000, (2, 24), generator=g)
    labels = input_ids.clone()
    labels[:, :7] = -100
    model.train()
    loss = model(input_ids=input_ids, labels=labels).loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trainable)

    dft_ops.unpatch(model)
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=input_ids).logits.double()
    logits = model(input_ids=input_ids).logits.double()
    z, r, y = logits[:, :-1], ref_logits[:, :-1], labels[:, 1:]
    mask = y != -100
    logp = torch.log_softmax(z, -1)
    logq = torch.log_softmax(r, -1)
    logp_y = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)            # KL(q_ref || p): direction "forward"
    per_token = -logp_y.exp().detach() * logp_y + 0.5 * kl
    reference = per_token[mask].sum() / mask.sum()
    ref_grads = torch.autograd.grad(reference, trainable)
    assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())
    worst = max(rel_err(a, b) for a, b in zip(grads, ref_grads))
    assert worst < 1e-4, worst


def test_config_keys_are_validated():
    from dft_ops.integrations.axolotl import DFTOpsArgs, build_objective

    assert build_objective("DFT") == "dft"
    asft = build_objective({"name": "ASFT", "kl_coef": 0.1, "direction": "reverse"})
    assert asft.kl_coef == 0.1 and asft.direction == "reverse"
    with pytest.raises(ValueError, match="^dft_ops_objective: expected one of"):
        build_objective("kl")
    with pytest.raises(ValueError, match="^dft_ops_objective: name 'Nope'"):
        build_objective({"name": "Nope"})
    with pytest.raises(ValueError, match="^dft_ops_objective: Power"):
        build_objective({"name": "Power", "beta": 2})
    base = dict(plugins=[PLUGIN])
    with pytest.raises(ValueError, match="liger_fused_linear_cross_entropy: another fused loss"):
        DFTOpsArgs.model_validate(dict(base, liger_fused_linear_cross_entropy=True))
    with pytest.raises(ValueError, match="dft_ops_reference: an ASFT objective needs a reference"):
        DFTOpsArgs.model_validate(dict(base, dft_ops_objective={"name": "ASFT", "kl_coef": 0.1}))
    with pytest.raises(ValueError, match="needs adapter: lora"):
        DFTOpsArgs.model_validate(dict(base, dft_ops_objective={"name": "ASFT", "kl_coef": 0.1},
                                       dft_ops_reference="adapters_disabled"))
    with pytest.raises(ValueError, match="rl: 'dpo'"):
        DFTOpsArgs.model_validate(dict(base, rl="dpo"))
    with pytest.raises(ValueError, match="dft_ops_options: 'objective'"):
        DFTOpsArgs.model_validate(dict(base, dft_ops_options={"objective": "ce"}))
    with pytest.raises(ValueError, match="backend"):
        DFTOpsArgs.model_validate(dict(base, dft_ops_options={"backend": "nope"}))
    assert DFTOpsArgs.model_validate(dict(base, dft_ops_options={"filter_eps": 1e-6})).dft_ops_objective == "dft"
