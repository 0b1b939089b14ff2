"""What talks to inference servers: the HTTP client and llama.cpp's server.

* :mod:`.client`: the HTTP client (httpx, bounded pool, timeouts, retries) and engine detection;
* :mod:`.answers`: reading answers (token ids, top-2 logprobs, token strings mapped to ids);
* :mod:`.llama_server`: build ``llama-server`` from the llama-cpp-python sdist into the cache;
  start/stop it.

Auditing a server is the audit core's job (:mod:`mgaudit.audit.remote` is the server backend).
"""

from .answers import EndpointError, NoLogprobsError
from .client import EndpointClient

__all__ = ["EndpointClient", "EndpointError", "NoLogprobsError"]
