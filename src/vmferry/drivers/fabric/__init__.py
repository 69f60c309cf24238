"""Fabric drivers: the switches and trunks between hosts."""
