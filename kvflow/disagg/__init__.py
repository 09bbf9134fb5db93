"""Disaggregated prefill and decode (survey §5.2.2): prefill workers and decode workers as Ray actors, the KV
cache moved between them (sync, async or layer-wise), a shared KV pool, early rejection and elastic roles.

  client.py      DisaggClient: the engine-core client of the workers (two phases per request)
  worker.py      PDWorker: an engine replica that hands requests off after prefill and takes them over
  connector.py   KVSender: the prefill side of the transfer, hooked into the engine core's step and layers
  kv_pool.py     KVPool: the shared store of prefix blocks (Mooncake's)
  elastic.py     the role-switching rule
"""
