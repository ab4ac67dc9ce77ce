"""The `eucareg` command line (click + rich)."""
