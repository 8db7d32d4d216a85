"""serve (Ray Serve LLM over vLLM): deployment.py (the vLLM deployment and rayllm's ingress over
Ray's OpenAI routes), http.py (keys, limits, queue bound, timeout, OpenAI error format),
stage.py (``run``, ``start``, ``shutdown``)."""
