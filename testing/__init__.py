"""The harness shared by tests/ and bench/: free ports, private Redis, the tiny model, processes.

A package of its own (not part of ``service``: none of it is used in serving), importable wherever the
project is installed, so pytest fixtures (tests/conftest.py) and bench scripts use the same code.

- ``free_port()``: a TCP port that was free a moment ago on 127.0.0.1 (``testing.network``).
- ``RedisServer``: a private ``redis-server`` on its own port, no persistence (``testing.redis_server``).
- ``random_clip``, ``save_tiny_checkpoint``, ``distinct_captions``: seeded models and inputs
  (``testing.models``).
- ``build_family(name)``: a tiny random model of each family the engine explains (CLIP, SigLIP, SigLIP 2,
  CLIPA, MetaCLIP 2, a timm ViT with registers) with its tokenizer built offline; ``build_real(arch)``: a
  real architecture with random weights and a local tokenizer (``testing.families``).
- ``Process``: any subprocess with its output in a log file; ``wait_healthy``/``wait_ready`` for APIs.
  ``ServiceLauncher``: API / worker / embedded ``python -m service.cli`` processes sharing one Redis
  and key prefix, with the tiny checkpoint; ``wait_until_ready`` for an in-process app
  (``testing.processes``).
- ``WorkerHold``: holds a worker's batches "running" until the test lets them go (``testing.hold``).
- ``chromium()``: a headless Debian Chromium (``testing.browser``); ``spy_conversions``
  (``testing.spies``).
- FiftyOne (``testing.fiftyone_env``, imported on its own): its cached virtualenv, a private
  ``mongod``, the App server, and the scenarios of ``testing.fiftyone_driver`` run inside it.
"""

from testing.browser import CHROMIUM, CHROMIUM_ARGS, chromium
from testing.families import FAMILIES, build_family, build_real, family_arch
from testing.hold import WorkerHold
from testing.models import distinct_captions, perturb_norms_and_biases, random_clip, save_tiny_checkpoint
from testing.network import free_port
from testing.processes import ROOT, SERVICE_CLI, Process, ServiceLauncher, wait_until_ready
from testing.redis_server import REDIS_SERVER, RedisServer
from testing.spies import spy_conversions

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "FAMILIES",
    "REDIS_SERVER",
    "ROOT",
    "SERVICE_CLI",
    "Process",
    "RedisServer",
    "ServiceLauncher",
    "WorkerHold",
    "build_family",
    "build_real",
    "chromium",
    "distinct_captions",
    "family_arch",
    "free_port",
    "perturb_norms_and_biases",
    "random_clip",
    "save_tiny_checkpoint",
    "spy_conversions",
    "wait_until_ready",
]
