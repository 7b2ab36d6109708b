"""distmeta: few-shot personalization of speech emotion recognition, trained on Ray."""

__version__ = "0.1.0"
