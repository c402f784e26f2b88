"""MoE routing (pure functions), the DeepSpeed-MoE layer, and routing diagnostics."""
