"""zipage's benchmark scripts, packaged as ``zipage.bench`` (``zipage bench``, ``zipage eval``).

Each script also runs on its own from a checkout: ``python benchmarks/throughput.py``,
``python benchmarks/quality.py``, ``python benchmarks/report.py``.
"""
