"""placeholder, filled below"""
RECIPES: dict = {}
