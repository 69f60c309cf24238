"""Softswitch drivers: bridges, ports, VLANs, flows and meters. ``base`` is the interface."""
