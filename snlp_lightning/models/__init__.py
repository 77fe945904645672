"""Model families: nanochat GPT and mHC, their batched / fused block evaluation, checkpoint I/O."""

from .gpt import GPT, TokenRangeError
from .stack import BlockInputs, WideBlocks, stack_blocks, wide_block_forward

__all__ = ["GPT", "TokenRangeError", "BlockInputs", "WideBlocks", "stack_blocks", "wide_block_forward"]
