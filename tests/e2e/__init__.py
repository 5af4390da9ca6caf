"""End-to-end checks against a running WebUI through its HTTP API: `python -m tests.e2e --host forge`."""
