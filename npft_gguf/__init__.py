"""npft-gguf: make a causal LM robust to round-to-nearest with NPFT, write it as GGUF, check it in llama.cpp."""

__version__ = "0.1.0"
