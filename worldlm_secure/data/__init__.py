"""Site data: the embedded synthetic world corpus, and text from files or the hub."""

from worldlm_secure.data.loading import load_site_streams
from worldlm_secure.data.synthetic import SiteStream, SyntheticSpec, entropy_rate, make_world_corpus
from worldlm_secure.data.tokenizer import ByteTokenizer, get_tokenizer

__all__ = ["ByteTokenizer", "SiteStream", "SyntheticSpec", "entropy_rate", "get_tokenizer", "load_site_streams", "make_world_corpus"]
