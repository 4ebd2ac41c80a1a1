"""The one exception our nodes raise for bad input: its message names the node input at fault.

ComfyUI shows a node's exception message in its error panel; raising this (from None) keeps that panel to one
readable line instead of a traceback through ditserve's loader.
"""

from __future__ import annotations


class NodeInputError(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
