"""``python -m liquiddiff`` (and ``torchrun ... -m liquiddiff``) is the ``liquiddiff`` command."""
import sys

from .cli import main

sys.exit(main())
