"""The agent's TOML configuration."""
