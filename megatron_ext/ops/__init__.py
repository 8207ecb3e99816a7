"""Pure tensor ops (torch reference + Triton kernels + autograd glue). No Megatron import here."""
