"""``python -m rayllm``: the same CLI as the ``rayllm`` script."""

from rayllm.cli import main

main()
