"""Test-wide settings: no network, no W&B account, and the location of the shared benchmark data."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Preset tokenizers are trained into this cache; tests and their subprocesses share a throwaway one.
os.environ.setdefault("MOEI_CACHE", tempfile.mkdtemp(prefix="moei-cache-"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOEI_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m moei_lightning ARGS`` as a user runs it, importing this checkout, with W&B offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MOEI_RUN_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "moei_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def shared_data() -> Path:
    """The third-party benchmark files (EQ-Bench, EmoBench); the test is skipped when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA} (set MOEI_SHARED_DATA to its folder)")
    return SHARED_DATA
