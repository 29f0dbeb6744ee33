"""Exception types that carry enough context for a one-screen message."""


class QuantgateError(Exception):
    """Base class: every error a user can cause names its cause."""


class MatrixError(QuantgateError):
    """The matrix or thresholds files are invalid."""


class NotStoredError(QuantgateError):
    """Only stored results may be read (a report), and a result or checkpoint asked for was never stored."""


class BuildError(QuantgateError):
    """A checkpoint could not be built, fetched or validated."""


class ServerError(QuantgateError):
    """The inference server failed to start or died."""


class EvaluationError(QuantgateError):
    """lm-eval failed or produced unusable output."""


class InsufficientSampleError(QuantgateError):
    """A gate cannot resolve its floor with the number of items evaluated."""
