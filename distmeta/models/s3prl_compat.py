"""The one place distmeta patches torchaudio for s3prl 0.4.18.

s3prl 0.4.18 was written for torchaudio < 2.9. At import time some of its
modules call `torchaudio.set_audio_backend("sox_io")` and import
`torchaudio.sox_effects`; torchaudio 2.11 has neither. We never use s3prl's
audio loading or sox effects (distmeta reads audio with soundfile), so:

- `set_audio_backend` becomes a no-op;
- `torchaudio.sox_effects` becomes a module whose functions raise a clear error.

s3prl's upstreams also log their whole config at INFO, s3prl warns on import that
ESPnet (for an upstream we never use) is missing, and its positional convolution
uses torch's deprecated `weight_norm` (a FutureWarning): on every Ray worker that
builds an upstream. All three are silenced here, where s3prl is imported.

Import `s3prl` only through `import_s3prl_hub()` so the shim is always in place.
"""

import importlib
import logging
import sys
import types
import warnings

import torchaudio


def _unavailable(*args, **kwargs):
    raise RuntimeError("torchaudio.sox_effects is not available in torchaudio >= 2.9; "
                       "distmeta reads audio with soundfile (distmeta.data.load_audio)")


def install() -> None:
    if not hasattr(torchaudio, "set_audio_backend"):
        torchaudio.set_audio_backend = lambda backend=None: None
    if "torchaudio.sox_effects" not in sys.modules:
        try:
            importlib.import_module("torchaudio.sox_effects")  # present in older torchaudio
        except ImportError:
            stub = types.ModuleType("torchaudio.sox_effects")
            stub.apply_effects_tensor = stub.apply_effects_file = _unavailable
            sys.modules["torchaudio.sox_effects"] = stub
            torchaudio.sox_effects = stub


def import_s3prl_hub():
    install()
    logging.getLogger("s3prl").setLevel(logging.WARNING)
    # an upstream we never build, announced on every import
    logging.getLogger("s3prl.upstream.espnet_hubert.expert").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*torch\.nn\.utils\.weight_norm.* is deprecated", category=FutureWarning)
    import s3prl.hub

    return s3prl.hub
