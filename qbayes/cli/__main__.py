"""``python -m qbayes.cli``: the same as the ``qbayes`` console script."""
import sys

from .app import main

sys.exit(main())
