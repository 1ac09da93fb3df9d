"""LoRA adapters made from models: low-rank factors of a fine-tune's update, written for ``peft``."""
