"""Hypervisor drivers: run guests and live-migrate them. ``base`` is the interface."""
