"""Thin adapters between the host WebUIs (AUTOMATIC1111, Forge) and the host-independent core."""
