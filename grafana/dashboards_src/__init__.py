"""One module per dashboard; each exposes `build() -> Dashboard` and its panels as functions."""
