"""Stage 2, student distillation: streaming cache data, the Proxy-KD losses and the Trainer subclass."""
