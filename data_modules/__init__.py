"""Lightning data modules, installed as `soma_lightning.data_modules`."""

from soma_lightning.data_modules.byte_corpus import ByteCorpus
from soma_lightning.data_modules.contract import EOS, PAD, tokenize
from soma_lightning.data_modules.multimodal import MultimodalCorpus

__all__ = ["ByteCorpus", "MultimodalCorpus", "tokenize", "PAD", "EOS"]
