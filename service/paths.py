"""Where the project's bundled files live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_NAME = "shapes"
DEMO_UPSCALER_NAME = "shapes-x4"


def bundled_model() -> Path:
    """The demo model shipped in `models/` (overridable with LDM_DEMO_MODEL)."""
    return Path(os.environ.get("LDM_DEMO_MODEL", REPO_ROOT / "models" / DEMO_MODEL_NAME))


def bundled_upscaler() -> Path:
    """The demo x4 upscaler shipped in `models/` (overridable with LDM_DEMO_UPSCALER)."""
    return Path(os.environ.get("LDM_DEMO_UPSCALER", REPO_ROOT / "models" / DEMO_UPSCALER_NAME))
