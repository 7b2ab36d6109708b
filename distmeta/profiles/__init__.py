"""Personalized models in use: a profile is what personalization produces for one person.

    store       ProfileStore: one safetensors + JSON pair per person, written atomically
    listener    a meta-trained Meta-PerSER model adapted to a listener's labelled clips, and predictions

The `distmeta` command (distmeta/cli.py) drives both.
"""
