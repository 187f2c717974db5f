"""What a run leaves on disk and how it is read back: checkpoints, JSON, TensorBoard events,
the report against the papers, sweep summaries, pictures, the statistics of a result.

Imports ``algorithms``, ``models`` and ``data`` at most; ``training`` and ``cli`` import it.
"""
