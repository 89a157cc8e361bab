"""pkd: Proxy-KD distillation of a black-box LLM through an aligned open proxy."""

__version__ = "0.1.0"
