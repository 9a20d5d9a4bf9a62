"""Fused Triton kernels for the decoder's elementwise stages (GPU only; the torch code in
``engine/models`` is the reference and the CPU path)."""
