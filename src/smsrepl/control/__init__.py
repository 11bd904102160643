"""The control plane's vocabulary (SMS v3): replication states, progress reports, consistency results."""
