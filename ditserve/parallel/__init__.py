"""Process groups and collectives. Only tensor-parallel state exists so far; sequence and CFG parallelism plug in
here (see ARCHITECTURE.md)."""
