"""serve (Ray Serve LLM over vLLM): deployment.py (the vLLM deployment, its replica the HTTP ingress),
http.py (keys, limits, queue bound, timeout, /health, OpenAI error format on vLLM's app),
stage.py (``run``, ``start``, ``shutdown``)."""
