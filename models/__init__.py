"""Models: the ESA baseline now; QA-Net and PIUnet register here."""
from .baseline import ESABaseline, bicubic_upscale, esa_baseline

__all__ = ["ESABaseline", "esa_baseline", "bicubic_upscale"]
