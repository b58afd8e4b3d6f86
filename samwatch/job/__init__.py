"""The job side: one job's run, sidecar to features, and the pipeline that overlaps jobs."""
