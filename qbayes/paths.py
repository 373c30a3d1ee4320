"""Where qbayes keeps the files it makes or fetches once: converted models, downloaded wheels,
compiled CPU extensions.

``$QBAYES_CACHE`` when set, else ``~/.cache/qbayes``. This module sits at the bottom of the
package (standard library only), so kernels and models alike may import it.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here): ``$QBAYES_CACHE`` or ``~/.cache/qbayes``."""
    return Path(os.environ.get("QBAYES_CACHE", Path.home() / ".cache" / "qbayes"))
