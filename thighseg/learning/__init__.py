"""Models (registry, dense-block U-Net) and training; needs the train extra (torch)."""
