"""The domain model: plain data and rules, no I/O."""
