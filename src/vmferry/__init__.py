"""vmferry: live-migrate virtual machines and carry their network with them."""

__version__ = "0.1.0"
