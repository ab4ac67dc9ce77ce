"""The registrar engine: sightings in, decisions through the core, effects out (hooks,
records, certificates), and the operator's trust administration."""
