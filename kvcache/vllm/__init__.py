"""vLLM interop: vLLM's block keys (``keys``), its KV event stream (``events``, ``subscriber``, with
CurveZMQ in ``curve``), a routing proxy in front of vLLM engines (``proxy``) and, for kvcache
workers behind it, the deployment's public prefixes it keys through (``public``)."""
