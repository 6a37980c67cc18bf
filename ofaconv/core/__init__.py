"""The family-independent core: safe loading, key maps, writing, reports, images, recipes, registry."""
