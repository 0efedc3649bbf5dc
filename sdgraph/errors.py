"""Errors sdgraph raises for bad input: each carries one line for the user and an exit code."""

__all__ = [
    "SdgraphError",
    "InputError",
    "UsageError",
    "VerificationError",
    "TargetUnavailable",
    "UnsupportedError",
    "PassError",
    "EXIT_CODES",
]

# Documented exit codes (README "Exit codes").
EXIT_CODES = {
    0: "success",
    1: "verification failed (numbers out of tolerance, strict match failure, NaN/Inf)",
    2: "bad input or usage (file, option, pipeline text, path)",
    3: "target or optional dependency not installed here",
    4: "graph not supported by the target (unsupported ops, dtypes or shapes)",
}


class SdgraphError(Exception):
    """Base class: ``str(err)`` is one line meant for the user."""

    exit_code = 2


class InputError(SdgraphError):
    """A file, directory or model that cannot be used as given."""

    exit_code = 2


class UsageError(SdgraphError):
    """Bad command-line or API usage: unknown pass, bad option value, bad pipeline text."""

    exit_code = 2


class PassError(SdgraphError):
    """A pass refused to run (requires() failed) or broke the graph."""

    exit_code = 1


class VerificationError(SdgraphError):
    """Numbers out of tolerance, a strict pattern with unmatched regions, NaN/Inf outputs."""

    exit_code = 1


class TargetUnavailable(SdgraphError):
    """A target's runtime or tool is not installed; the message names the extra to install."""

    exit_code = 3


class UnsupportedError(SdgraphError):
    """The graph uses something the target cannot take; ``problems`` lists them per node."""

    exit_code = 4

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])
