"""opd_megatron: on-policy distillation of language models on Megatron-core."""

__version__ = "0.1.0"
