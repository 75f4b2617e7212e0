"""btfast: fast, exact inference for Hugging Face BridgeTower models."""

__version__ = "0.1.0"
