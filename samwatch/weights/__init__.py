"""Model weights: the registry of entries, and getting their files onto disk, verified."""
