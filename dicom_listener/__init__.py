"""DICOM C-STORE listener: spool, series completion, the segmentation pipeline, DICOM outputs."""
