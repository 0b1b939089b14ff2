"""Audit a running OpenAI-compatible inference server (``--endpoint``), and build/run llama.cpp's server.

* :mod:`.client`: the HTTP client (httpx, bounded pool, timeouts, retries) and answer parsing;
* :mod:`.audit`: solo vs under-load (and warm vs cold cache) scans into the trace schema, and verify;
* :mod:`.llama_server`: build ``llama-server`` from the llama-cpp-python sdist into the cache; start/stop it.
"""

from .audit import (EndpointScanConfig, EndpointScanResult, EndpointVerifyConfig, probe, scan_endpoint,
                    verify_endpoint)
from .client import EndpointClient, EndpointError, NoLogprobsError

__all__ = ["EndpointClient", "EndpointError", "EndpointScanConfig", "EndpointScanResult", "EndpointVerifyConfig",
           "NoLogprobsError", "probe", "scan_endpoint", "verify_endpoint"]
