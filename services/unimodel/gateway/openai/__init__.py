"""OpenAI-compatible API: chat, completions (with the semantic cache in front), embeddings."""
