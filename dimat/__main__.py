"""``python -m dimat simulate ...`` is the same as the ``dimat`` console script."""
import sys

from dimat.cli import main

sys.exit(main())
