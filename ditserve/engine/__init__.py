"""The request lifecycle: loading, validation, running, results."""
