"""The curated GPU test set: ``pytest -m gpu_smoke`` (bench/gpu_run.sh call1, with DFT_OPS_CONFIG=0).

The whole suite on a GPU (1281 tests, >= 525 distinct kernel compiles, 326 tuner keys) takes 15-25
minutes; a GPU window has 15 in all. These tests cover each kernel path once: the forward, the
"gemm" backward (the logit-gradient kernel and the cuBLAS products, fp32 output accumulation), the
fused backward, the one-pass head (row passes and cuBLAS), gradient filtering, the precise (two-part G)
mode, bf16 / fp32 (tf32x3) / mixed dtypes with every optional feature, ASFT's reference-head variants of
all three kernels, Distill's JSD mixture terms, token_logprobs' entropy and per-token temperature
terms, the public API with per-token upstream gradients and statistics, and the GPU-only checks: no
host sync in either backward, the gemm backward's memory bound, int64 offsets past 2^31 elements,
hardware arithmetic (tanh, soft-capping), run-to-run agreement of the fused atomics. (Every mode at a
real head size against float64 runs just before, as python -m bench.smoke.)

Listed by node id rather than marked in each file (tests/conftest.py adds the marker), so the
set is one list to curate and the test files stay as they are; tests/test_gpu_plan.py fails when
an id here no longer names a test. Cost (docs/benchmarks/README.md): with one configuration forced
each test compiles a few kernel variants, about 75 distinct ones in all (73 counted on the interpreter);
call1 runs the set on 6 pytest-xdist workers (the device has pytest-xdist and 16 cores) so the
compiles overlap.

Error model for hardware arithmetic (what tolerances in these tests allow for on a GPU, where the
CPU interpreter computes in NumPy float32 / float64):
- ``tl.exp`` lowers to ``ex2.approx.f32`` of ``x * log2(e)``: about 2 ulp, plus the rounding of the
  product (``|x| * 2^-24`` relative in the result); fp32 division is ``div.full.f32`` (2 ulp).
  tanh built from them stays within ~8 ulp; tests allow 16 on a GPU (4 on the interpreter).
- fp32 products run tf32x3 (three tf32 products; the dropped low x low term and the low parts'
  own rounding leave ~2^-21 relative per term): logits and fp32 gradients within ~1e-6 of float64,
  losses within ~4e-6 relative (the interpreter's fp32 dot: ~1e-7).
- bf16 products are exact in fp32; G is rounded to bf16 once with round-to-nearest-even on both.
- The fused backward adds partial products with fp32 atomics in no fixed order: two runs differ
  by fp32 rounding (~1e-7 relative), never bitwise-equal by guarantee; compare with a tolerance.
- cuBLAS may pick other kernels (split-K) for other shapes: bitwise equality holds only for the
  same call on the same shapes.
"""

GPU_SMOKE = (
    # forward + both backwards, every optional feature (bias, softcap, temperature, smoothing,
    # class weights, rows), bf16 and fp32; and autocast's mixed dtypes
    "tests/test_backends.py::test_forward_and_backward_match_float64[all-bf16-triton-gemm]",
    "tests/test_backends.py::test_forward_and_backward_match_float64[all-bf16-triton-fused]",
    "tests/test_backends.py::test_forward_and_backward_match_float64[all-fp32-triton-gemm]",
    "tests/test_backends.py::test_forward_and_backward_match_float64[all-fp32-triton-fused]",
    "tests/test_backends.py::test_forward_and_backward_match_float64[plain-bf16-hidden-fp32-head-triton-gemm]",
    "tests/test_backends.py::test_forward_and_backward_match_float64[plain-fp32-as-bf16-triton-fused]",
    # masked (-inf) logits, filtering, the precise mode, hardware tanh and soft-capping
    "tests/test_backends.py::test_minus_inf_logits_mask_the_vocabulary[5.0-triton-gemm]",
    "tests/test_backends.py::test_filtering_keeps_the_uniform_term_exact",
    "tests/test_backends.py::test_precise_mode_is_elementwise_accurate_where_terms_cancel",
    "tests/test_backends.py::test_tanh_is_accurate_at_every_magnitude",
    "tests/test_backends.py::test_softcap_precision[triton-gemm]",
    "tests/test_backends.py::test_any_strides_of_per_token_and_per_class_tensors[triton-fused]",
    # the gemm backward: several splits and token chunks, fp32 accuracy, the precise two-part G
    "tests/test_gemm_backward.py::test_every_plan_matches_float64[bf16]",
    "tests/test_gemm_backward.py::test_fp32_gradients_are_fp32_accurate",
    "tests/test_gemm_backward.py::test_precise_gemm_is_elementwise_accurate_where_terms_cancel",
    # GPU only: no host sync, fp32-output products, the memory bound
    "tests/test_gemm_backward.py::test_backward_has_no_host_sync[gemm]",
    "tests/test_gemm_backward.py::test_backward_has_no_host_sync[fused]",
    "tests/test_gemm_backward.py::test_products_use_fp32_output_on_cuda",
    "tests/test_gemm_backward.py::test_gemm_backward_memory_is_dhidden_plus_workspace",
    # the public API: per-token upstream gradients, statistics, no tokens x vocabulary tensor
    "tests/test_linear_cross_entropy.py::test_matches_reference[3-none-dft-torch.bfloat16-triton]",
    "tests/test_linear_cross_entropy.py::test_stats_match_reference[torch.bfloat16-triton]",
    "tests/test_linear_cross_entropy.py::test_never_builds_tokens_by_vocab[triton-gemm]",
    # ASFT: the reference head through every kernel, both KL terms, filtering with the KL terms
    "tests/test_asft.py::test_kernels_match_torch_backend_across_splits[both]",
    "tests/test_asft.py::test_options_match_reference[triton-gemm-forward-bf16-none-temperature-Dref]",
    "tests/test_asft.py::test_options_match_reference[triton-fused-reverse-fp32-mean-shift-bias-softcaps-stats]",
    "tests/test_asft.py::test_gradient_filtering_keeps_the_kl_terms[forward]",
    # the one-pass head (the default): row passes + cuBLAS products, G packed in place, every feature,
    # bf16 and fp32, the accurate label entry on peaked rows, ASFT's second head in the same pass
    "tests/test_one_pass.py::test_matches_float64[triton-dft-fp32-mean-shift-bias-stats]",
    "tests/test_one_pass.py::test_matches_float64[triton-dft-bf16-sum-softcap-temp-ignore5]",
    "tests/test_one_pass.py::test_matches_float64[triton-ce-fp32-mean-items-smooth-cw-zloss]",
    "tests/test_one_pass.py::test_asft_second_head_in_the_same_pass[triton-reverse]",
    "tests/test_one_pass.py::test_peaked_rows_keep_the_label_entry_accurate[triton]",
    "tests/test_linear_cross_entropy.py::test_never_builds_tokens_by_vocab[triton-onepass]",
    # token_logprobs (RL): the per-token temperature and entropy-term kernel variants, both backwards, bf16 and
    # fp32, upstream gradients of log-probs and entropies; -inf logits (entropy 0, not NaN); all tokens ignored
    "tests/test_token_logprobs.py::test_every_option_against_float64[torch.bfloat16-triton-gemm]",
    "tests/test_token_logprobs.py::test_every_option_against_float64[torch.float32-triton-fused]",
    "tests/test_token_logprobs.py::test_masked_vocabulary_entropy_is_finite[triton-gemm]",
    "tests/test_token_logprobs.py::test_all_tokens_ignored[triton-fused]",
    # Distill: the JSD's mixture terms (the mixture pass, the g term of both backwards, the row passes'
    # second read) and a teacher of another hidden size through a patched model
    "tests/test_distill.py::test_kernels_match_torch_backend_across_splits",
    "tests/test_distill.py::test_row_passes_with_a_mixture[caps1]",
    "tests/test_distill.py::test_options_match_reference[triton-fused-jsd-bf16-none-temperature-D2-stats]",
    "tests/test_distill.py::test_options_match_reference[triton-onepass-jsd-fp32-mean-shift-bias-softcaps-stats]",
    "tests/test_distill.py::test_options_match_reference[triton-gemm-jsd-bf16-items-ignore5-unlabeled-mask-stats]",
    "tests/test_patching_distill.py::test_teacher_on_the_triton_backend[auto]",
    # hardware-only checks written for the GPU (tests/test_gpu_hardware.py)
    "tests/test_gpu_hardware.py::test_hidden_rows_past_2_31_elements[gemm]",
    "tests/test_gpu_hardware.py::test_hidden_rows_past_2_31_elements[fused]",
    "tests/test_gpu_hardware.py::test_vocabulary_rows_past_2_31_elements[gemm]",
    "tests/test_gpu_hardware.py::test_vocabulary_rows_past_2_31_elements[fused]",
    "tests/test_gpu_hardware.py::test_fused_atomics_agree_run_to_run",
)

# tests that hold tens of GB of the GPU (4 GB operands, float64 references of them): one at a time
# when the set runs on several pytest-xdist workers (conftest.py groups them on one worker)
ONE_AT_A_TIME = (
    "tests/test_gpu_hardware.py::test_hidden_rows_past_2_31_elements",
    "tests/test_gpu_hardware.py::test_vocabulary_rows_past_2_31_elements",
    "tests/test_gemm_backward.py::test_gemm_backward_memory_is_dhidden_plus_workspace",
)
