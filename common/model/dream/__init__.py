"""Dream (Dream-org/Dream-v0-Instruct-7B): a Qwen2.5 body trained as a masked diffusion model."""
