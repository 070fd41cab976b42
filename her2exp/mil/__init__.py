"""Attention MIL over bags of cached tile embeddings (`mil=...`; docs/architecture.md, "Bags")."""
