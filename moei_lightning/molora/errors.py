"""The MoLoRA library's own error: bad adapter settings or adapter files, never a bug."""


class MoLoRAError(ValueError):
    """An invalid MoLoRA setting, an unmatched target layer, or an unreadable adapter directory."""
