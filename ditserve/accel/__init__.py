"""Speed features that attach to a model from outside: compile, CUDA graphs, DiT caching (cache.py); offload and FP8 later."""
