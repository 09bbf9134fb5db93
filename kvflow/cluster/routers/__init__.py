"""The routing policies, one module per policy, each registering itself in `kvflow.cluster.router.ROUTERS`:

  round-robin     healthy replicas in turn
  least-load      the smallest `ReplicaLoad.load`, ties in rotation
  power-of-two    the less loaded of two random healthy replicas (Mitzenmacher; TetriInfer's rand-2)
  cache-aware     longest prefix hit in a global prefix index, balanced and with hot-prefix replication
                  (Preble; SGLang's router)
  predicted-load  the least outstanding (predicted) tokens
  session         sticky by the OpenAI `user` field, rebinding when the replica is down or overloaded

Every policy expects `loads` to describe the whole fleet in replica order (`loads[i].index == i`) and returns
the `index` of a healthy replica. None imports torch.
"""
