"""``python -m mambamorph``: the ``mambamorph`` command, runnable as a module (which is how
``torchrun ... -m mambamorph train ...`` starts each process of a distributed run)."""

import sys

from mambamorph.cli import run

if __name__ == "__main__":
    sys.exit(run())
