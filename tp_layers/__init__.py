"""Tensor-parallel layers and model families (``tpfuse.tp_layers``): FLUX.2, Qwen-Image, FLUX.3, and whole
pipelines (the text encoder by transformers' tensor-parallel plan, :func:`parallelize_pipeline`).

Column-parallel layers split a weight by output features (no communication forward, all-reduce of the input
gradient backward); row-parallel layers split by input features (all-reduce forward, nothing backward). A block is
column -> row pairs. Everything runs on CPU with gloo and on GPU with NCCL.
"""

from .comm import (
    CommStats,
    comm_stats,
    copy_to_tp_region,
    gather_from_tp_region,
    get_rank,
    get_world_size,
    reduce_from_tp_region,
    scatter_to_tp_region,
)
from .checkpoint import LoadReport, load_sharded
from .flux2 import PRESETS, DoubleStreamBlock, Flux2Config, SingleStreamBlock, apply_rope, rope_cos_sin
from .launch import RankError, run_ranks
from .linear import ColumnParallelLinear, RowParallelLinear
from .lora import adapt_lora, lora_state_dict, shard_lora_state_dict
from .sharding import check_blocks, local_blocks, shard_ranges, shard_tensor, unshard_tensors
from .model import from_pretrained, parallelize
from .save import save_pretrained
from .flux2.tp_blocks import TPDoubleStreamBlock, TPSingleStreamBlock
from .families import Family, UnsupportedModelError, register_family
from .embedding import VocabParallelEmbedding, VocabParallelLMHead
from .encoders import UnsupportedEncoderError, shard_text_encoder
from .pipeline import load_pipeline, memory_report, parallelize_pipeline
from .tp_attention import HeadRMSNorm

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "copy_to_tp_region",
    "reduce_from_tp_region",
    "gather_from_tp_region",
    "scatter_to_tp_region",
    "comm_stats",
    "CommStats",
    "get_rank",
    "get_world_size",
    "Flux2Config",
    "PRESETS",
    "SingleStreamBlock",
    "DoubleStreamBlock",
    "TPSingleStreamBlock",
    "TPDoubleStreamBlock",
    "HeadRMSNorm",
    "rope_cos_sin",
    "apply_rope",
    "check_blocks",
    "local_blocks",
    "shard_ranges",
    "shard_tensor",
    "unshard_tensors",
    "run_ranks",
    "RankError",
    "parallelize",
    "load_sharded",
    "from_pretrained",
    "save_pretrained",
    "LoadReport",
    "adapt_lora",
    "lora_state_dict",
    "shard_lora_state_dict",
    "Family",
    "UnsupportedModelError",
    "register_family",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "shard_text_encoder",
    "UnsupportedEncoderError",
    "parallelize_pipeline",
    "load_pipeline",
    "memory_report",
]
