"""The host agent: owns one host's QEMU guests (through QMP) and softswitch (through OVSDB)."""
