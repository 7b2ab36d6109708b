"""Models: s3prl upstreams and the SER model."""

from distmeta.models.ser import SERHead, SERModel, set_scope, trainable_parameters
from distmeta.models.upstream import Upstream, UpstreamConfig

__all__ = ["SERHead", "SERModel", "Upstream", "UpstreamConfig", "set_scope", "trainable_parameters"]
