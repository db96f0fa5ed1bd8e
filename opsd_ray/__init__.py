"""opsd_ray: on-policy self-distillation with the purified PMI target, on Ray."""

__version__ = "0.1.0"
