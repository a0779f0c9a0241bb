"""thighseg: CT thigh-muscle segmentation (extensor, flexor, adductor) served by Triton."""

__version__ = "0.1.0"
