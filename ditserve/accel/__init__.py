"""Speed features that attach to a model from outside: compile now; offload, caching and FP8 later."""
