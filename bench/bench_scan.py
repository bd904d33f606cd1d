"""Selective-scan benchmark: ``python bench/bench_scan.py [--lengths ...] [--repeat N]``.

The code lives in :mod:`mambamorph.benchmarks.scan` so that ``mambamorph bench`` can use it from
an installed package; this script is its command-line entry.
"""

from mambamorph.benchmarks.scan import main

if __name__ == "__main__":
    main()
