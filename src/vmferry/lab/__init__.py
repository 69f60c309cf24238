"""The built-in lab: a data center of namespaces, Open vSwitch instances and QEMU on one machine."""
