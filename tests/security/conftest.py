"""Every test of the attack suite runs with the network cut and gets a marker file to watch."""

from security.attack import marker, no_network

__all__ = ["marker", "no_network"]
