"""Models: loading presets and tokenizers, the offline built-in models, model shapes."""
