"""Training backends other than memtrain's own trainer (``memtrain train --backend ...``)."""
