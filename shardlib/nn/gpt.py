"""Reference GPT (placeholder; being written)."""
