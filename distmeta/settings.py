"""What every job in `jobs/` can be told: one config dataclass per job.

A job's run is configured, lowest precedence first, by these defaults, a preset
(`--preset NAME` reads `configs/<job>/NAME.yaml`), `--config FILE.yaml`, then
`key.sub=value` overrides (see `distmeta.config`). `configs/<job>/default.yaml`
lists every key of a job with its default and what it means; a test keeps it
equal to the dataclass below.
"""

from dataclasses import dataclass, field

from distmeta.data.sources import DataConfig
from distmeta.meta.actors import ActorConfig
from distmeta.meta.learner import MetaConfig
from distmeta.listener.pretrain import PretrainConfig
from distmeta.listener.protocol import ProtocolConfig
from distmeta.models.speech_lm import SpeechLMConfig
from distmeta.models.upstream import UpstreamConfig
from distmeta.speaker.baselines import ClassifierConfig
from distmeta.speaker.encoder import EncoderPretrainConfig
from distmeta.speaker.evaluate import EvaluationConfig
from distmeta.speaker.maml import SpeakerMAMLConfig
from distmeta.speaker.metaicl import MetaICLConfig
from distmeta.sweep import SweepConfig


@dataclass
class MakeCorpusConfig:
    """jobs/make_corpus.py: build (or read and check) a corpus and describe its listeners."""
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "runs/corpus"


@dataclass
class MetaTrainConfig:
    """jobs/meta_train.py: listener personalization end to end, from pretraining to Table 1."""
    data: DataConfig = field(default_factory=DataConfig)
    # Pretrained once per machine on synthetic audio of other speakers (training/tiny_wavlm.py); "tiny"
    # is the same model with random weights, any s3prl name a real upstream.
    upstream: UpstreamConfig = field(default_factory=lambda: UpstreamConfig(name="tiny_pretrained"))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    # One actor holds a training's 9 training annotators: on pooled features it computes its tasks together,
    # and more actors on a 2-core machine only contend for it (docs/listener.md); 0: one actor per task.
    actors: ActorConfig = field(default_factory=lambda: ActorConfig(max_actors=1))
    distributed: bool = True  # false: the serial in-process trainer (the reference; same numbers)
    # Meta-trainings side by side (a split's Table 2 variants), each on its own actors, which it holds for the
    # whole job: one training leaves the 2-core machine half idle (its actor waits for the driver's
    # validation, the driver for its actor). parallel x actors must fit the cluster.
    parallel: int = 2
    checkpoint_every: int = 10  # outer steps between checkpoints
    resume: bool = False  # continue from the checkpoints under out/checkpoints (`--resume DIR`)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    out: str = "runs/meta_train"
    models_dir: str = "runs/models"  # pretrained and meta-trained models, reused when settings match
    # Ray's storage on a cluster: a folder every node mounts, or a pyarrow URI (s3://bucket/distmeta);
    # "": a folder under models_dir, enough on one node
    storage: str = ""
    experiment: str = "distmeta-meta-train"
    # Meta-PerSER models registered as distmeta-listener (pyfunc, with the alias <scenario>-<annotator>):
    # "first" the first unseen split's (else the first split's), "all" every split's, "none"
    register: str = "first"
    ray_address: str = ""  # "": $RAY_ADDRESS when set (e.g. under `ray job submit`), else a local instance


@dataclass
class RotationConfig:
    scenarios: tuple[str, ...] = ("seen", "unseen")
    test_annotators: tuple[str, ...] = ()  # () = every annotator who labels all sessions


@dataclass
class PretrainJobConfig:
    """jobs/pretrain.py: SSL-E, Linear and Multi for every split of the rotation, on Ray Train."""
    data: DataConfig = field(default_factory=DataConfig)
    upstream: UpstreamConfig = field(default_factory=lambda: UpstreamConfig(name="tiny_pretrained"))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    protocol: RotationConfig = field(default_factory=RotationConfig)
    kinds: tuple[str, ...] = ("ssl_e", "linear", "multi")
    out: str = "runs/pretrain"
    models_dir: str = "runs/models"
    storage: str = ""  # as in MetaTrainConfig
    experiment: str = "distmeta-pretrain"
    ray_address: str = ""


@dataclass
class MetaICLJobConfig:
    """jobs/metaicl_train.py: speaker personalization by in-context learning, Tables II-IV."""
    data: DataConfig = field(default_factory=lambda: DataConfig(source="speakers"))
    # the frozen speech encoder: speech_encoder (pretrained by the job unless `path` names a checkpoint) or any s3prl upstream
    upstream: UpstreamConfig = field(default_factory=lambda: UpstreamConfig(name="speech_encoder"))
    encoder: EncoderPretrainConfig = field(default_factory=EncoderPretrainConfig)  # its pretraining (speaker/encoder.py)
    encoder_layer: int = -1  # the upstream layer the speech LM reads (-1: the last)
    model: SpeechLMConfig = field(default_factory=SpeechLMConfig)
    meta: MetaICLConfig = field(default_factory=MetaICLConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    maml: SpeakerMAMLConfig = field(default_factory=SpeakerMAMLConfig)  # MAML on speaker tasks (Table II's MAML rows)
    ablation: bool = False  # Table IV: also meta-train with TO+LD (7 shots) and Neutral (0..7): two more stage-2 runs
    baselines: bool = True  # the classifier baselines and 1-shot_N
    out: str = "runs/metaicl"
    models_dir: str = "runs/icl-models"  # frames and trained speech LMs, reused when settings match
    storage: str = ""  # as in MetaTrainConfig
    experiment: str = "distmeta-metaicl"
    ray_address: str = ""


def tune_base() -> MetaTrainConfig:
    base = MetaTrainConfig()
    base.meta.val_every = 1  # a validation report every outer step for ASHA
    base.meta.val_shots = base.protocol.shots  # trials sweeping meta.shots are scored at the meta-test K
    return base


@dataclass
class TuneJobConfig:
    """jobs/tune.py: sweep Meta-PerSER's (or the speech LM's) hyperparameters with Ray Tune."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    base: MetaTrainConfig = field(default_factory=tune_base)  # what every trial starts from; best_config.yaml is one
    icl_base: MetaICLJobConfig = field(default_factory=MetaICLJobConfig)  # the same for spaces with `job: metaicl_train`
    out: str = "runs/tune"
    experiment: str = "distmeta-tune"


# Job name (its file in jobs/ and its folder in configs/) -> its config.
JOBS = {"make_corpus": MakeCorpusConfig, "meta_train": MetaTrainConfig, "pretrain": PretrainJobConfig,
        "metaicl_train": MetaICLJobConfig, "tune": TuneJobConfig}
