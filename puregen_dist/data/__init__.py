"""Datasets as ImageSets: loaders, seeded selection, and tensor conversions."""
