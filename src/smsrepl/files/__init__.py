"""File-level replication: tree scans with the 5.10.1 path rules, and tree comparison."""
