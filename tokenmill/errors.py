"""Errors the engine raises for bad input. Each names the problem and the limit it broke."""

from __future__ import annotations


class TokenmillError(Exception):
    """Base class for tokenmill's own errors."""


class InvalidRequestError(TokenmillError, ValueError):
    """A request the engine cannot serve (bad parameter, prompt too long). `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ModelLoadError(TokenmillError):
    """A model directory that cannot be loaded: missing/corrupt files or an unsupported architecture."""
