"""Exceptions that mean "the user gave something wrong", as opposed to a bug.

The CLI turns these into a one-line message and a non-zero exit code, without a traceback.
Library code raises them with a message that names the file (when there is one) and the problem.
"""


class MambaMorphError(Exception):
    """Base class of every error the CLI reports as a user-facing message."""


class InputError(MambaMorphError, ValueError):
    """Bad input data or arguments: unreadable file, wrong dimensionality, NaN voxels, ..."""
