"""The registrar's HTTP API (aiohttp): component, operator and peer endpoints."""
