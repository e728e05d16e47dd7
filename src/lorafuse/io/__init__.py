"""Reading and writing weight files without loading a model."""
