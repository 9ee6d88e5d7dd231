"""Data: folder datasets for training and inference, and the dataset tools' pieces (Pick-a-Pic,
HPDv2, selection, safe extraction, score caches, atomic item writes)."""
