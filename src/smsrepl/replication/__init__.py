"""Replication over time: the control plane's session commands, continuous sync rounds, lag."""
