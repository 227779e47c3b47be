"""``python -m mlsae_lens`` is the ``mlsae-lens`` command."""

import sys

from mlsae_lens.cli import main

sys.exit(main())
