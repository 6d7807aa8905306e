"""Typed errors. Library code raises these with one clear sentence; only the CLI (unembed/cli/) maps them to
exit codes and stderr lines."""


class UnembedError(Exception):
    """Base class of every error unembed raises on purpose."""


class BadInputError(UnembedError):
    """One input item (a file, a caption, a record) cannot be used. The run can go on without it."""

    def __init__(self, item, reason: str):
        self.item = str(item)
        self.reason = reason
        super().__init__(f"{self.item}: {reason}")


class ModelLoadError(UnembedError):
    """A model, decoder or embedder cannot be found, downloaded or built."""


class MismatchError(UnembedError):
    """Two things that must agree do not (embedder spec, embedding dimension, decoder kind)."""


class UnsafeFileError(UnembedError):
    """A file would need unpickling (or another unsafe format) to load; unembed refuses it."""


class RequestError(Exception):
    """A request that cannot be served as sent: an HTTP status and one line naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def did_you_mean(name: str, known) -> str:
    """"; did you mean 'x'?" for the closest known name, or nothing."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
