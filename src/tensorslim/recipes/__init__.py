"""Recipes: one YAML file describes a whole run (model, data, ordered stages)."""

from tensorslim.recipes.schema import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe"]
