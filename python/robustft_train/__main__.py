"""python -m robustft_train: the same as the robustft-train command."""
import sys

from .cli import main

sys.exit(main())
