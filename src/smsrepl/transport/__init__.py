"""Transport: mutual TLS (tls), framed channel, sender and receiver endpoints."""
