"""Validation: perplexity and KL divergence by llama.cpp's protocol, and throughput, on GGUF files
(through llama.cpp) and on float or fake-quantized models (through torch), on one scale."""
