"""eucalab: network-namespace labs, lab clouds and the demo. Imports eucareg, never the reverse."""
