"""Flower transport: a ``ServerApp`` and a ``ClientApp`` over the same protocol sessions.

The apps live in :mod:`.server_app` and :mod:`.client_app` (both named ``app``); point
``[tool.flwr.app.components]`` of a Flower app at them (see ``examples/flower/``). Each
protocol stage of the configured aggregator is one exchange over the grid
(:mod:`.channel`); client nodes drive the same
:class:`~fedcollm_secure.secagg.base.ClientEndpoint` state machine as the in-process
transport (rebuilt per message by :mod:`.replay`) and the same trainer. For ``ckks`` one
SuperNode is the key authority (:mod:`.key_authority`, node config
``fedcollm-role="key-authority"``), reached only through messages the ServerApp relays;
:mod:`.trust` holds the client-side key rules (pinned or first-use authority key, identity).

Importing this package does not import ``flwr`` (an optional extra): :mod:`.config`,
:mod:`.replay`, :mod:`.key_authority` and :mod:`.trust` work without it; :mod:`.channel`,
:mod:`.client_app` and :mod:`.server_app` need it, and :mod:`.loopback` needs its
executables.
"""

from .config import FlowerSettings, fedcollm_config, flower_settings, split_run_config
from .replay import EndpointState, KeystreamRandom

__all__ = ["EndpointState", "FlowerSettings", "KeystreamRandom", "fedcollm_config",
           "flower_settings", "split_run_config"]
