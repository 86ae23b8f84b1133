"""The embedded default model's files (Hugging Face layout); see README.md here."""
