"""Process groups and collectives: groups.py (the world split into sequence, CFG and tensor parallelism),
sharding.py (what a model declares about its sequence), sequence.py (Ulysses and Ring around our attention),
exchange.py and symmetric.py (how Ulysses's all-to-alls move), reduce.py (tensor-parallel sums), vae.py (VAE tiles
shared out over the ranks), state.py (the tensor-parallel group the layers read)."""
