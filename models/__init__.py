"""The model catalog: one TOML file per known model (name:tag)."""
