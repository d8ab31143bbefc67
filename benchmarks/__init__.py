"""The benchmark scripts, each run as ``python benchmarks/NAME.py`` (the commands recorded in ``results/``).

Run that way, a script's own folder is first on ``sys.path``, so it imports ``_common`` as a top-level module.
``compare`` and ``peer_timm`` are also imported by the tests, as ``from benchmarks import compare``; those two
import ``._common`` when they are imported as part of this package. No file here edits ``sys.path``.
"""
