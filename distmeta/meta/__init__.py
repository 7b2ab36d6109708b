"""The meta-learning core both personalization paths use: MAML with per-layer per-step rates, the outer loop,
checkpoints, and the Ray task actors that hold one person's task each.

    maml        MetaModel (a model + its LSLR rates, with adapt and meta_gradients); the functional core
    learner     MetaConfig, one task's meta-gradient, MetaLearner, the shared outer loop, the serial trainer
    checkpoint  meta-training checkpoints (save, resume)
    actors      Ray task actors holding the training tasks (one each, or several); actor replacement; chaos

A path supplies its model (listener.metatrain: the SER model from SSL-E; speaker.maml: the speaker
classifier), its tasks (data.scenarios.Task) and a replica its actors build.
"""
