"""LLaDA2 MoE (inclusionAI/LLaDA2.0-mini, LLaDA2.1-mini): block diffusion with a mixture of experts."""
