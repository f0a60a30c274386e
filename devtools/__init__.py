"""Development tools (local stand-ins, helpers for demos and tests); never shipped in the layer."""
