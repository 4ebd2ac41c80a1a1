"""The HTTP server: OpenAI-compatible routes over the scheduler (no model code runs in this process)."""
