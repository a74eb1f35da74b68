"""Ray cluster access, job submission, metrics exporters and storage paths; no training logic."""
