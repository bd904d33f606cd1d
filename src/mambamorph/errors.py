"""Exceptions that mean "the user gave something wrong", as opposed to a bug.

The CLI turns these into a one-line message and a non-zero exit code, without a traceback.
Library code raises them with a message that names the file (when there is one) and the problem.
"""


class MambaMorphError(Exception):
    """Base class of every error the CLI reports as a user-facing message."""


class InputError(MambaMorphError, ValueError):
    """Bad input data or arguments: unreadable file, wrong dimensionality, NaN voxels, ..."""


class OutputExistsError(InputError):
    """An output file or a non-empty output folder exists and replacing it was not asked for.

    The message names the path and says nothing of command-line flags; the CLI adds how to ask
    for the replacement (``--overwrite``).
    """


class WriteError(MambaMorphError, OSError):
    """An output could not be written (full disk, vanished or read-only folder, ...).

    The message names the file and the operating system's reason; whatever was complete before
    the failed write (an earlier checkpoint, other outputs) is left as it was.
    """


class PeerError(MambaMorphError):
    """Another process of a distributed run failed (rank 0's error, passed on to the others so
    that every process stops at the same point); that process reports the error itself, so the
    CLI of the other processes prints nothing more."""
