"""``python -m runner`` is ``image-runner``."""

import sys

from runner.cli import main

sys.exit(main())
