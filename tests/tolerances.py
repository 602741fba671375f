"""Named numerical tolerances for every test tier (see STYLE.md 'Testing conventions')."""

# fp32 PyTorch vs an independent fp32 implementation (transformers) or the uncached reference.
REF_ATOL = 1e-5
# fp32 PyTorch vs fp32 ONNX Runtime, per component and end to end.
ONNX_FP32_ATOL = 1e-4
ONNX_FP32_RTOL = 1e-4
# fp16/bf16 typed graphs vs the fp32 PyTorch reference: cosine per output.
TYPED_MIN_COSINE = {"fp16": 0.9999, "bf16": 0.9999}
# Converted weights applied as PyTorch Linear/Conv vs numpy evaluation of the JAX einsums (fp32).
EINSUM_ATOL = 2e-5
EINSUM_RTOL = 1e-5
# The same fp32 model run at batch B vs batch 1 (different kernel blocking): reordering noise only.
BATCH_ORDER_ATOL = 1e-5
