"""MoEI on PyTorch Lightning: a frozen backbone plus a MoLoRA expert bank with intra/inter routing."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["from_pretrained"]


def __getattr__(name: str) -> Any:
    """``moei_lightning.from_pretrained``, imported on first use (it pulls in transformers)."""
    if name == "from_pretrained":
        from moei_lightning.pretrained import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'moei_lightning' has no attribute {name!r}")
