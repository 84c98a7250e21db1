"""MergeNet's parameter adapter and the unit that fuses and learns with it."""

from .param_attention import ParamAttention, as_matrix
from .unit import KnowledgeFusionUnit, resolve_device

__all__ = ["ParamAttention", "KnowledgeFusionUnit", "as_matrix", "resolve_device"]
