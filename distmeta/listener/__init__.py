"""Listener personalization (Meta-PerSER): an SER model pretrained on aggregated labels, meta-trained with
MAML so it adapts to one annotator from a few of their labels.

    pretrain     SSL-E / Linear / Multi pretraining, one Ray Train run (training.launcher)
    metatrain    the SER meta-model (SSL-E + LSLR rates), its inputs, one split's meta-training, the cache,
                 and the replica the task actors build (the meta-learning core itself: distmeta.meta)
    metatest     adapting the meta-trained model to one person (meta-test and enrollment)
    adapters     the few-shot methods (baselines, ceilings, Meta-PerSER) behind one predict(episode)
    protocol     the meta-test protocol (in process or on episode actors), Tables 1 and 2, the shots sweep, paired comparisons
"""
