"""Which presets exist, of which kind, and where their files live.

The built presets (`tiny-llama`, `tiny-t5`) are made on the fly by :mod:`.built_presets`; a shipped
preset is a `save_pretrained` directory inside the package (rebuilt by `moei_lightning.presets`).
"""

from __future__ import annotations

import os
from pathlib import Path

from moei_lightning.backbone.config import Kind

BUILT_PRESETS: dict[str, Kind] = {"tiny-llama": "causal", "tiny-t5": "seq2seq"}
"""Presets built from a fixed seed and a tokenizer trained on the bundled samples."""
SHIPPED_PRESETS: dict[str, Path] = {"tiny-llama-gi": Path(__file__).parents[1] / "presets" / "tiny_llama_gi"}
"""Presets stored in the package as `save_pretrained` directories (rebuilt by `moei_lightning.presets`)."""
PRESETS: dict[str, Kind] = {**BUILT_PRESETS, "tiny-llama-gi": "causal"}


def cache_root() -> Path:
    """Where the built presets' files live: `$MOEI_CACHE`, else `~/.cache/moei_lightning`."""
    return Path(os.environ.get("MOEI_CACHE") or Path.home() / ".cache" / "moei_lightning")
