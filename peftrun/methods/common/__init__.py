"""Pieces shared by several methods: which modules to adapt (targets), the wrapper layer of the
LoRA family, mixed-tenant routing, tensor state, pooling over the prompt, the rational
activation, the decoder-block list, and the PEFT LoRA format."""
