"""serve (Ray Serve): engine.py (continuous-batching decode), openai.py (the OpenAI protocol: request
schemas and response shapes), http.py (FastAPI routes, limits, error mapping), deployment.py (the
Serve deployment and application), stage.py (``run``, ``start``, ``shutdown``)."""
