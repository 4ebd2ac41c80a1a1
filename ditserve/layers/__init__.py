"""Shared building blocks for the native DiTs. Models are written only in terms of these."""
