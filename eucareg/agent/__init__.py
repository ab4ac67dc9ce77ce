"""The per-host agent: announces, collects credentials, hosts the registrar."""
