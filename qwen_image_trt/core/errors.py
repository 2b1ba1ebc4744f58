"""Errors a user can act on: each names the field, the value given and what is allowed."""

from __future__ import annotations


class QitrtError(Exception):
    """Base class for errors this toolkit raises on purpose."""


class InputError(QitrtError, ValueError):
    """A user-supplied value is out of range. Raised before any heavy work starts."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")


class CheckpointError(QitrtError):
    """A checkpoint folder is missing, incomplete, or of another model type."""


class EngineMismatchError(QitrtError):
    """An engine folder was built from another checkpoint, config, or toolchain."""
