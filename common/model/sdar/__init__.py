"""SDAR (JetLM/SDAR-*-Chat): a Qwen3 body trained for block diffusion."""
