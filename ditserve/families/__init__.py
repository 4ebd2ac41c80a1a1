"""One registration per model family (see registry.py for what a registration holds).

Adding a family = `models/<family>.py` (the DiT) + `pipelines/<family>.py` (the stages) + a module here that
defines `SPEC`, named in `registry.FAMILY_MODULES`. These modules are plain data: importing them imports no torch.
"""
