"""Measurement: overlap metrics, volume indices, QC flags, agreement statistics (ICC,
Bland-Altman)."""
