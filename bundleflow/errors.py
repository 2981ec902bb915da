"""The one error type for mistakes a user can cause (bad file, bad config, missing GPU).

The CLI turns a :class:`BundleflowError` into one line on stderr and exit code 2; anything
else is a programming error and keeps its traceback.
"""


class BundleflowError(Exception):
    """A user-facing error: the message names the file or key and says how to fix it."""
