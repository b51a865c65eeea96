"""Student rollouts: batched generation on Megatron GPTModels at any TP/PP."""
