"""Reporters turn a report dict into text; only the CLI decides where the text goes."""
