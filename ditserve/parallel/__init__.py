"""Several ranks on one model. groups.py: how the ranks divide the work (ulysses × ring × cfg × tp) and the
process groups that carry it; state.py and reduce.py: the tensor-parallel group the layers read and its all-reduce;
sharding.py: what a model declares about how its sequence splits; sequence.py and exchange.py: Ulysses and Ring
around attention, and how Ulysses's all-to-alls move; symmetric.py: the symmetric-memory buffers both use; vae.py:
the tiled VAE decode spread over the ranks. CFG parallelism is the pipeline's (each half of the ranks runs one
guidance branch on its group). docs/parallel.md has the measurements."""
