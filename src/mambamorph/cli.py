"""Command-line front end (filled in as the library grows)."""

import sys


def main(argv=None) -> int:
    print("mambamorph: not wired yet", file=sys.stderr)
    return 1
