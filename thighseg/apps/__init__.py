"""Applications on top of the pipeline: cohort batch mode, evaluation, demo, benchmark."""
