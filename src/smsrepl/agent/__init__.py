"""Agent integration with the SMS v3 control plane (see client.py)."""
