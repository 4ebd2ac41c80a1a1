"""Errors a user can fix, shared by the CLI, the server and the engine. A leaf module: catching one of them
imports nothing else."""

from __future__ import annotations


class FieldError(ValueError):
    """One input is invalid: `field` names it (an engine setting, a request field, a LoRA argument) and `message`
    says what is wrong and what is allowed. `str()` is "field: message"; callers that word the field their own way
    (a CLI flag, an API parameter) read the two parts."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class LoaderError(Exception):
    """A model folder or checkpoint cannot be loaded; the message says what is wrong and where."""
