"""Personalized models in use: a profile is what personalization produces for one person.

    store         ProfileStore: one safetensors file per person (tensors + JSON metadata), renamed into place
    listener      a meta-trained Meta-PerSER model adapted to a listener's labelled clips, and probabilities
    speaker       a speaker's enrollment pairs (frames + label words) for the MetaICL speech LM, and probabilities
    personalizer  `distmeta.Personalizer`: both kinds behind one Python API (enroll, predict, classify)
    uploads       enrollment archives and forms read in memory within limits (the server's)
    serve         `distmeta serve`: a Ray Serve application with a FastAPI ingress for many people's profiles
    mlflow_model  the pyfunc flavour: registered models that mlflow.pyfunc.load_model and `mlflow models serve` load

The `distmeta` command (distmeta/cli.py) and the server are thin layers over `Personalizer`.
"""
