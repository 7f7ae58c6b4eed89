"""``python -m timm_splat`` / ``accelerate launch -m timm_splat``: the ``timm-splat`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
