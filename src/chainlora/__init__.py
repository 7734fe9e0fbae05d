"""chainlora: Chain of LoRA (COLA) fine-tuning on PEFT LoRA."""

__version__ = "0.1.0"
