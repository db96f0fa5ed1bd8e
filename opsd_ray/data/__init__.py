"""Training data: sources and row checks, the three prompts, the context windows."""
