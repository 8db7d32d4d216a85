"""eval: lm.py scores packed validation blocks (loss, perplexity, token accuracy) in Ray Data actors;
stage.py (``run``) writes the figures."""
