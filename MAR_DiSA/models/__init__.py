"""MAR model files (upstream layout)."""
