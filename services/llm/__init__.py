"""LLM tiers: llama.cpp worker processes, the ModelManager that owns them, chat proxying."""
