"""One series through the stages: assemble or load -> infer -> measure -> emit."""
