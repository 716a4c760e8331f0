"""Where distill keeps downloads: ``$DISTILL_HOME`` (default ``~/.cache/distill``).

Nothing is created at import time; callers create the folders they write to::

    timm.create_model(name, pretrained=True, cache_dir=weights_dir())
"""

from __future__ import annotations

import os
from pathlib import Path


def distill_home() -> Path:
    """Return ``$DISTILL_HOME`` if set (and not empty), else ``~/.cache/distill``."""
    env = os.environ.get("DISTILL_HOME")
    return Path(env).expanduser() if env else Path("~/.cache/distill").expanduser()


def weights_dir() -> Path:
    """Return the folder where pretrained weight downloads land (``distill_home()/weights``)."""
    return distill_home() / "weights"


def datasets_dir() -> Path:
    """Return the folder that holds one sub-folder per dataset (``distill_home()/datasets``)."""
    return distill_home() / "datasets"
