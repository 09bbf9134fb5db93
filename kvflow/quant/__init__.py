"""Weight-only quantization (int8, int4, GGUF Q4/Q8 kept quantized): see weights.py."""
