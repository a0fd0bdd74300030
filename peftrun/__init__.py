"""peftrun: a config-driven trainer for parameter-efficient fine-tuning of language models."""

__version__ = "0.1.0"
