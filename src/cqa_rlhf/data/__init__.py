"""Raw community-QA sources, text cleaning and the prepared tables."""
