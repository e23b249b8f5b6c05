"""vLLM interop: vLLM's block keys (``keys``), its KV event stream (``events``, ``subscriber``, with
CurveZMQ in ``curve``) and a routing proxy in front of vLLM engines (``proxy``)."""
