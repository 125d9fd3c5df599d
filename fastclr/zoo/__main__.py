"""``python -m fastclr.zoo``: see fastclr.zoo.cli."""
import sys

from fastclr.zoo.cli import main

sys.exit(main())
