"""The Forge Neo harness and its checks."""
