"""Personalized models in use: a profile is what personalization produces for one person.

    store       ProfileStore: one safetensors + JSON pair per person, written atomically
    listener    a meta-trained Meta-PerSER model adapted to a listener's labelled clips, and predictions
    speaker     a speaker's enrollment pairs (frames + label words) for the MetaICL speech LM, and predictions
    kinds       both behind one interface: load_base, enroll_from, predict_with
    serve       `distmeta serve`: a Ray Serve application for many people's profiles

The `distmeta` command (distmeta/cli.py) drives both.
"""
