"""Speaker personalization by in-context learning (the ICL paper): a speech LM reads a speaker's enrollment
utterance-label pairs in its prompt.

    episodes   targets and enrollment pairs, drawn for training or reproducibly for evaluation; UA_spk
    encoder    the speech encoder's pretraining on the training speakers (a Ray Train run), then frozen
    metaicl    MetaICL: the training stages, the frame bank, the Ray Train job
    baselines  the classifier baselines (Scratch, Pretrained, Personalized_N, Personalized_A)
    maml       MAML on speaker tasks (distmeta.meta's meta-learner and task actors), beside ICL
    evaluate   k-shot inference under every condition the tables need
    tables     Tables II-IV and the shots plot
"""
