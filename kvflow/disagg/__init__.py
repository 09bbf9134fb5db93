"""Disaggregated prefill and decode (survey §5.2.2): prefill workers and decode workers as Ray actors, the KV
cache moved between them (sync, async or layer-wise), a shared KV pool, early rejection and elastic roles.

  client.py      DisaggClient: the engine-core client of the workers (two phases per request)
  worker.py      PDWorker: an engine replica that hands requests off after prefill and takes them over
  connector.py   KVSender: the prefill side of the transfer, hooked into the engine core's step and layers
  transport.py   what carries a sync handoff's blocks: Ray's object store or Mooncake's transfer engine
(the shared KV pool is kvflow/memory/host_store.py's HostKVStore as a Ray actor)
  elastic.py     the role-switching rule
"""
