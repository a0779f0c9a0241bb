"""Bottom layer: labels and HU windows, constants and defaults, resampling, memory release."""
