"""prep (Ray Data): sources.py reads files, clean.py cleans, tokenizer.py builds or loads the vocabulary,
pack.py packs token streams into blocks, stage.py drives them (``run``)."""
