"""Baichuan2-style remote code: copied beside the weights, loaded through `auto_map`."""
