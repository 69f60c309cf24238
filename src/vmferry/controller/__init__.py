"""The controller: inventory, VMs, port profiles, fabric and migrations, behind an HTTP API."""
