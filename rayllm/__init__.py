"""rayllm: fast, elastic LLM training on Ray (prep -> train -> tune -> eval -> serve)."""

__version__ = "0.1.0"
