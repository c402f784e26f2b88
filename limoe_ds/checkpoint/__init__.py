"""Checkpoints: atomic save and exact resume (``io``), layout-free reading and export (``convert``),
resharding to another layout (``reshard``)."""
