"""eval: lm.py scores packed validation blocks (loss, perplexity, token accuracy) in Ray Data actors;
tasks.py reads task files, generates answers (in actors or over an OpenAI-compatible endpoint) and
scores them with metrics.py (the reference libraries and the code sandbox); stage.py (``run``)
writes the figures."""
