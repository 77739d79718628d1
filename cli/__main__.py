"""``python -m cli``: the ``ia2cache`` command, runnable as a module.

torchrun launches modules with ``-m``, so this is how a multi-process job starts::

    torchrun --nproc-per-node=2 -m cli -- collect --task sentiment_remap --n 64
    torchrun --nproc-per-node=2 -m cli -- distill --cache KEY --method a2t

Put ``--`` before the command: torchrun parses every option it sees with abbreviations on, so
without it ``--n 64`` is taken for an ambiguous torchrun option (``--nnodes``,
``--nproc-per-node``, ...) and torchrun exits. A leading ``--`` is dropped here.

Every rank runs the same command; rank 0 alone prints the result (see ia2cache.distributed).
"""

from __future__ import annotations

import sys

from cli.main import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["--"]:
        del sys.argv[1]
    main()
