"""LLaDA checkpoints, tokenizer and the network."""

from pathlib import Path


def default_model_path() -> Path:
    """Directory of the embedded default model shipped inside the package."""
    return Path(__file__).resolve().parent / "default"
