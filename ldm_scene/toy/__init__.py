"""The toy scene world: a procedural renderer with exact labels, the toy model and its labelers."""
