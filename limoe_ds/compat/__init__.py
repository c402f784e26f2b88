"""Workarounds for the exact versions of DeepSpeed and megatron-core this project runs on."""
