"""The FLUX.3 family (diffusers' ``Flux3Transformer2DModel``): :mod:`.tp_blocks` shards its per-mode and joint
single blocks, :mod:`.family` registers the plan in :mod:`tpfuse.tp_layers.families`. Imports diffusers only when
a model is parallelized."""
