"""Models every stage loads: resolving paths, GGUF import, tiny test models, chat tokenization, LoRA rules."""
