"""MoEI on PyTorch Lightning: a frozen backbone plus a MoLoRA expert bank with intra/inter routing."""

__version__ = "0.1.0"
