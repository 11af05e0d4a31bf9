"""Ray Data purification pipeline and the artifact store (may import Ray)."""
