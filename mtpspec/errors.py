"""Errors mtpspec raises for bad input: each message names the file or parameter and the problem."""


class MtpspecError(Exception):
    """Base class: a user-facing error with a one-line message."""


class CheckpointError(MtpspecError):
    """A model or drafter checkpoint is missing, malformed or unsupported."""


class InputError(MtpspecError):
    """A prompt or a generation parameter is invalid."""
