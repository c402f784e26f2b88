"""Sparse MoE: pure top-1 routing (``routing``), typed routing statistics (``stats``), expert
parameter names (``names``) and the DeepSpeed-MoE layer adapter (``layer``)."""
