"""The registry store: the durable record of what the registrar's memory holds."""
