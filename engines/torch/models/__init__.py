"""Model implementations in plain torch. Every supported architecture is Llama-shaped."""

from tokenrelay_engines.torch.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
