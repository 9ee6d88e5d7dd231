"""rpo: Diffusion-DRO (ranking-based preference optimisation of diffusion models)."""

__version__ = "0.1.0"
