"""Ray Tune sweeps (may import Ray and MLflow)."""
