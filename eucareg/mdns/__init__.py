"""mDNS/DNS-SD: the announce/browse interface and its backends."""
