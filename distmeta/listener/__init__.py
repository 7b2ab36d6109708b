"""Listener personalization (Meta-PerSER): an SER model pretrained on aggregated labels, meta-trained with
MAML so it adapts to one annotator from a few of their labels.

    pretrain     SSL-E / Linear / Multi pretraining, one Ray Train run (training.launcher)
    maml         MetaModel (an SER model + its LSLR rates, with adapt and meta_gradients); the functional core
    metatrain    MetaLearner, the shared outer loop, the serial trainer
    checkpoint   meta-training checkpoints (save, resume)
    distributed  Ray task actors holding the training tasks (one each, or several); actor replacement; chaos
    adapters     the few-shot methods (baselines, ceilings, Meta-PerSER) behind one predict(episode)
    protocol     the meta-test protocol (in process or on episode actors), Tables 1 and 2, the shots sweep, paired comparisons
"""
