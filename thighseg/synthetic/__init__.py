"""Synthetic thigh CT: the phantom generator, cohorts, CT DICOM series writer."""
