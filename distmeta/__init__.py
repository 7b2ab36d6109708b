"""distmeta: few-shot personalization of speech emotion recognition, trained on Ray.

    import distmeta
    p = distmeta.Personalizer.from_pretrained("models:/distmeta-listener/1")
    p.predict("clip.wav", profile=p.enroll(clips, labels, person="alice"), top_k=3)

`Personalizer` (distmeta/profiles/personalizer.py) is imported on first use, so `import distmeta` stays light
for Ray workers.
"""

__version__ = "0.1.0"
__all__ = ["Personalizer", "Profile", "__version__"]


def __getattr__(name):
    if name in ("Personalizer", "Profile"):
        from distmeta.profiles import personalizer

        return getattr(personalizer, name)
    raise AttributeError(f"module 'distmeta' has no attribute {name!r}")
