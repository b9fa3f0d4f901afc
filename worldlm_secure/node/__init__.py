"""Running nodes of a deployed world: `node start` (one site, federation or root over gRPC + mTLS) and
`world up` (a whole world as separate OS processes on loopback). See README "Deployment"."""

from worldlm_secure.node.config import NodeConfig, load_node_config
from worldlm_secure.node.runner import start_node

__all__ = ["NodeConfig", "load_node_config", "start_node"]
