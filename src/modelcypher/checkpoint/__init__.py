"""Reading and writing Hugging Face model directories."""

from modelcypher.checkpoint.reader import Checkpoint

__all__ = ["Checkpoint"]
