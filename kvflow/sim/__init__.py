"""The cluster simulator (`kvflow sim`): kvflow's real Scheduler, KVCacheManager and router policies, driven
by a discrete-event loop and a simulated model runner whose step times come from a cost model (a hardware
profile: calibrated on this machine, or a GPU roofline). No torch here: only calibrate.py and fidelity.py import it (through the engine).

  cost_model.py  hardware profiles and step-time models (registry: linear, roofline)
  workload.py    synthetic workloads (random, chat, multitenant, bursts) and the trace file format
  runner.py      the simulated model runner (SchedulerOutput -> RunnerOutput, plus the step's seconds)
  replica.py     one simulated engine: the real Scheduler + KVCacheManager + the simulated runner
  cluster.py     the event loop: arrivals, routing, steps, P/D hand-off, the serverless autoscaler
  report.py      bench-serve metrics, utilisation over time, table, JSON and PNG
  compare.py     the survey's runtimes (presets) on one workload and hardware budget
  calibrate.py   fits the linear cost model from measured steps of the real engine (imports torch)
  served.py      that fit again on served steps: a fleet's co-run figures, on totals and the fixed cost
  fidelity.py    a real run against its simulation (imports torch)
  cli.py         `kvflow sim`, `kvflow sim calibrate`, `kvflow sim compare`
"""
