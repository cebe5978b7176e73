"""The coordinator's core, under every transport: one step's state and its mimicry replies (``coordinator``),
the metrics it reports (``metered_coordinator``), the asynchronous per-step barrier every transport shares
(``barrier``) and the rows each coordinator shard serves (``shards``). It imports no engine or transport
(``tests/unit/test_import_structure.py``).
"""
