"""Configuration: the typed schema, recipes, composing and validation."""
