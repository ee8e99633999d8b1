"""The Qwen-Image family (diffusers' ``QwenImageTransformer2DModel``): :mod:`.tp_blocks` shards its two-stream
blocks, :mod:`.family` registers the plan in :mod:`tpfuse.tp_layers.families`. Imports diffusers only when a
model is parallelized."""
