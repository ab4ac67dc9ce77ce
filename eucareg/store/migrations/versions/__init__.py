"""The registry's schema revisions, oldest first; each names the one before it."""
