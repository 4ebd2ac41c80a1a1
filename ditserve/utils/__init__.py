"""Memory and timing stats, media encoding."""
