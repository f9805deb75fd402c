"""`python -m qcbdefense ...`: the CLI without an installed console script (a copied checkout, a GPU box)."""
import sys

from qcbdefense.cli import main

sys.exit(main())
