"""Weight-only quantization (int8, int4, GGUF Q4/Q8 kept quantized): formats.py (quantizers and packed
layouts), layers.py (Int8Linear, Int4Linear, quantize_model), gguf_repack.py (a GGUF's blocks kept)."""
